"""Training checkpoints that resume exactly: trainable weights, optimizer, scheduler, RNG, data position.

No pickle anywhere: tensors go to safetensors, everything else to JSON. A checkpoint directory::

    <run_dir>/checkpoints/step-00000120/
        weights.safetensors   the trainable parameters by name (loadable on their own)
        state.safetensors     optimizer tensors ("optim/<param index>/<key>"), torch/CUDA RNG
                              states ("rng/torch", "rng/cuda/<device>"), named generators
                              ("generator/<name>"), numpy's MT19937 key ("rng/numpy")
        state.json            step, optimizer param groups and non-tensor state, scheduler
                              state_dict, Python / numpy RNG scalars, the trainer's data position
                              and any extra JSON the trainer keeps (best validation loss, ...)
    <run_dir>/checkpoints/LATEST   the name of the newest complete checkpoint

Atomicity: a checkpoint is written into a temporary sibling directory (with a manifest of its
files' sha256, checked on load) and renamed into place, and ``LATEST`` is replaced (temp file +
rename) only after that; a crash at any point leaves the
previous checkpoint intact and named by ``LATEST``. Older checkpoints beyond ``keep`` are removed
after the new one is in place. ``save_named`` writes a checkpoint under a fixed name (``best``).

Exact resume: restoring weights, the optimizer's per-parameter tensors and hyper-parameters, the
scheduler's counters, every RNG the run draws from (torch CPU and CUDA, Python ``random``, numpy
and the trainer's own ``torch.Generator`` objects) and the position in the data stream puts the
run in the same state it had when the checkpoint was written, so on CPU a resumed run ends with
bitwise the same weights as an uninterrupted one (tested by the trainers with SIGKILL).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._files import atomic_write_via, replace_dir_atomically
from .._manifest import CorruptFile, verify_dir

__all__ = ["CHECKPOINT_DIR", "latest_checkpoint", "load_checkpoint", "save_checkpoint", "save_named"]

CHECKPOINT_DIR = "checkpoints"
LATEST = "LATEST"
WEIGHTS = "weights.safetensors"
STATE_TENSORS = "state.safetensors"
STATE_JSON = "state.json"
_STEP_DIR = re.compile(r"^step-(\d{8})$")


def _step_name(step: int) -> str:
    return f"step-{step:08d}"


def _json_default(value: Any):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"checkpoint state: {type(value).__name__} is not JSON-serialisable ({value!r:.80})")


# --------------------------------------------------------------------------------------------- save
def _optimizer_parts(optimizer: torch.optim.Optimizer) -> tuple[dict, dict[str, torch.Tensor]]:
    """Split ``optimizer.state_dict()`` into JSON (groups, scalars) and tensors (``optim/i/key``)."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, per_param in sd["state"].items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim/{index}/{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    return {"param_groups": sd["param_groups"], "scalars": scalars}, tensors


def _rng_parts(generators: Mapping[str, torch.Generator]) -> tuple[dict, dict[str, torch.Tensor]]:
    tensors = {"rng/torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for device, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda/{device}"] = state
    for name, gen in generators.items():
        tensors[f"generator/{name}"] = gen.get_state()
    kind, key, pos, has_gauss, cached = np.random.get_state()
    tensors["rng/numpy"] = torch.from_numpy(np.asarray(key, dtype=np.int64))
    version, py_state, gauss_next = random.getstate()
    meta = {"python": [version, list(py_state), gauss_next], "numpy": [kind, int(pos), int(has_gauss), float(cached)]}
    return meta, tensors


def _write_checkpoint(
    dest: Path,
    step: int,
    params: Mapping[str, torch.Tensor],
    optimizer,
    scheduler,
    generators: Mapping[str, torch.Generator],
    data: dict | None,
    extra: dict | None,
) -> Path:
    from safetensors.torch import save_file

    optim_meta, optim_tensors = _optimizer_parts(optimizer)
    rng_meta, rng_tensors = _rng_parts(generators)
    state = {
        "step": int(step),
        "optimizer": optim_meta,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng": rng_meta,
        "data": data or {},
        "extra": extra or {},
    }
    text = json.dumps(state, default=_json_default)  # fail before touching the disk
    weights = {name: p.detach().cpu().contiguous() for name, p in params.items()}

    def fill(tmp: Path) -> None:
        save_file(weights, str(tmp / WEIGHTS))
        save_file({**optim_tensors, **rng_tensors}, str(tmp / STATE_TENSORS))
        (tmp / STATE_JSON).write_text(text)
        for f in (WEIGHTS, STATE_TENSORS, STATE_JSON):
            with open(tmp / f, "rb") as fh:
                os.fsync(fh.fileno())

    return replace_dir_atomically(dest, fill)


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    *,
    params: Mapping[str, torch.Tensor],
    optimizer,
    scheduler=None,
    generators: Mapping[str, torch.Generator] | None = None,
    data: dict | None = None,
    extra: dict | None = None,
    keep: int = 2,
) -> Path:
    """Write ``<run_dir>/checkpoints/step-XXXXXXXX`` atomically, point ``LATEST`` at it, prune old ones.

    Args:
        params: the trainable parameters by name (what the run changes; frozen weights are not saved).
        optimizer / scheduler: their ``state_dict`` is saved (tensors to safetensors, the rest JSON).
        generators: the trainer's own ``torch.Generator`` objects (data order, dropout...) by name.
        data: the position in the data stream (epoch, index in the epoch's order, ...), JSON.
        extra: anything else JSON the trainer needs on resume (best validation loss, ...).
        keep: how many ``step-*`` checkpoints to keep (>= 1); named ones (``best``) are never pruned.
    """
    if keep < 1:
        raise ValueError(f"keep: expected >= 1, got {keep}")
    if step < 0:
        raise ValueError(f"step: expected >= 0, got {step}")
    root = Path(run_dir) / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    path = _write_checkpoint(root / _step_name(step), step, params, optimizer, scheduler, generators or {}, data, extra)
    atomic_write_via(root / LATEST, lambda tmp: Path(tmp).write_text(path.name + "\n"))
    steps = sorted(p for p in root.iterdir() if _STEP_DIR.match(p.name))
    for old in steps[:-keep]:
        if old.name != path.name:
            shutil.rmtree(old, ignore_errors=True)
    return path


def save_named(
    run_dir: str | os.PathLike,
    name: str,
    step: int,
    *,
    params: Mapping[str, torch.Tensor],
    optimizer,
    scheduler=None,
    generators: Mapping[str, torch.Generator] | None = None,
    data: dict | None = None,
    extra: dict | None = None,
) -> Path:
    """Write a checkpoint under a fixed name (e.g. ``best``), atomically; ``LATEST`` is not touched."""
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*", name) or _STEP_DIR.match(name):
        raise ValueError(f"name: expected a word such as 'best' (not 'step-N'), got {name!r}")
    root = Path(run_dir) / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    return _write_checkpoint(root / name, step, params, optimizer, scheduler, generators or {}, data, extra)


# --------------------------------------------------------------------------------------------- load
def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of a run (named by ``LATEST``), or None when there is none.

    Without ``LATEST`` (lost, or deleted by hand) the newest ``step-*`` directory that is complete
    and matches its manifest is taken: step checkpoints that exist are never silently ignored."""
    root = Path(run_dir) / CHECKPOINT_DIR
    pointer = root / LATEST
    if not pointer.is_file():
        steps = sorted((p for p in root.iterdir() if _STEP_DIR.match(p.name)), reverse=True) if root.is_dir() else []
        for path in steps:
            try:
                verify_dir(path, required=True)
            except CorruptFile:
                continue  # a checkpoint cut short by a crash or damaged: an older one is whole
            if (path / STATE_JSON).is_file():
                return path
        return None
    path = root / pointer.read_text().strip()
    if not (path / STATE_JSON).is_file():
        raise ValueError(f"run_dir: {pointer} names {path.name}, which is missing or incomplete")
    return path


def load_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The trainable weights of a checkpoint directory, by name."""
    from safetensors.torch import load_file

    return load_file(str(Path(path) / WEIGHTS))


def _restore_optimizer(optimizer, meta: dict, tensors: Mapping[str, torch.Tensor]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim/"):
            _, index, name = key.split("/", 2)
            state.setdefault(int(index), {})[name] = value
    for index, scalars in meta["scalars"].items():
        state.setdefault(int(index), {}).update(scalars)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _restore_rng(meta: dict, tensors: Mapping[str, torch.Tensor], generators: Mapping[str, torch.Generator]) -> None:
    torch.set_rng_state(tensors["rng/torch"])
    cuda = sorted((k for k in tensors if k.startswith("rng/cuda/")), key=lambda k: int(k.rsplit("/", 1)[1]))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
    for name, gen in generators.items():
        key = f"generator/{name}"
        if key not in tensors:
            raise ValueError(
                f"generators: checkpoint has no generator {name!r} (has "
                f"{sorted(k[10:] for k in tensors if k.startswith('generator/'))})"
            )
        gen.set_state(tensors[key])
    version, py_state, gauss_next = meta["python"]
    random.setstate((version, tuple(py_state), gauss_next))
    kind, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, tensors["rng/numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))


def load_checkpoint(
    path: str | os.PathLike,
    *,
    params: Mapping[str, torch.Tensor],
    optimizer=None,
    scheduler=None,
    generators: Mapping[str, torch.Generator] | None = None,
) -> dict:
    """Restore a checkpoint in place and return its JSON state (``step``, ``data``, ``extra``).

    ``params`` must name exactly the saved trainable parameters (same shapes); their values are
    copied in without replacing the tensors, so an optimizer built on them stays valid.
    """
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / STATE_JSON).is_file():
        raise ValueError(f"path: {path} is not a checkpoint directory (no {STATE_JSON})")
    verify_dir(path)  # one flipped bit in the weights or the Adam state is an error, not a resume
    weights = load_weights(path)
    if set(weights) != set(params):
        missing, unexpected = sorted(set(params) - set(weights)), sorted(set(weights) - set(params))
        raise ValueError(
            f"params: checkpoint {path} has other trainable parameters "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    for name, p in params.items():
        if weights[name].shape != p.shape:
            raise ValueError(
                f"params: {name!r} expected shape {list(p.shape)}, checkpoint has {list(weights[name].shape)}"
            )
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(weights[name])
    state = json.loads((path / STATE_JSON).read_text())
    tensors = load_file(str(path / STATE_TENSORS))
    if optimizer is not None:
        _restore_optimizer(optimizer, state["optimizer"], tensors)
    if scheduler is not None:
        if state["scheduler"] is None:
            raise ValueError(f"scheduler: checkpoint {path} was saved without a scheduler")
        scheduler.load_state_dict(state["scheduler"])
    _restore_rng(state["rng"], tensors, generators or {})
    return {"step": state["step"], "data": state["data"], "extra": state["extra"]}
