"""Argument checks shared by the ops: every error names the argument, what was expected and what came."""

from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    return value


def check_floating(name: str, value: object, dtypes=FLOAT_DTYPES) -> torch.Tensor:
    tensor = check_tensor(name, value)
    if tensor.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name}: expected a floating tensor ({allowed}), got dtype {tensor.dtype}")
    return tensor


def check_ndim(name: str, tensor: torch.Tensor, ndim: int, shape_letters: str) -> None:
    if tensor.dim() != ndim:
        raise ValueError(f"{name}: expected {ndim}-D [{shape_letters}], got shape {tuple(tensor.shape)}")


def check_same_device(**tensors: torch.Tensor | None) -> torch.device:
    present = {k: v for k, v in tensors.items() if v is not None}
    devices = {k: v.device for k, v in present.items()}
    first_name, first = next(iter(devices.items()))
    for name, device in devices.items():
        if device != first:
            raise ValueError(f"{name}: expected a tensor on {first} (the device of {first_name}), got {device}")
    return first


def check_positive(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a positive number, got {type(value).__name__}")
    if not (value > 0) or math.isinf(value):
        raise ValueError(f"{name}: expected a finite number > 0, got {value}")
    return float(value)


# Set on a class-id tensor once its values passed for a vocabulary size: (tensor version, V).
_VALIDATED = "_jomed_fast_valid_class_ids"


def check_class_ids(name: str, class_ids: object, vocab_size: int, device: torch.device) -> torch.Tensor:
    """class ids: int64 ``[C]``, C >= 1, distinct, each in ``[0, V)``.

    The value checks read the ids back to the host (three syncs on a GPU), so they run once per
    tensor and vocabulary size: a tensor that passed is marked with its version counter, and later
    calls with the same, unmodified tensor (a task's ids, reused every step) check only its
    metadata. An in-place change bumps the version and the values are checked again.
    """
    ids = check_tensor(name, class_ids)
    if ids.dtype != torch.int64:
        raise TypeError(f"{name}: expected dtype int64, got {ids.dtype}")
    if ids.dim() != 1 or ids.numel() == 0:
        raise ValueError(f"{name}: expected a non-empty 1-D tensor [C], got shape {tuple(ids.shape)}")
    if ids.device != device:
        raise ValueError(f"{name}: expected a tensor on {device}, got {ids.device}")
    stamp = (ids._version, vocab_size)
    if getattr(ids, _VALIDATED, None) == stamp:
        return ids
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"{name}: expected ids in [0, {vocab_size}) (V={vocab_size}), got min {lo} and max {hi}")
    if torch.unique(ids).numel() != ids.numel():
        raise ValueError(f"{name}: expected distinct ids, got duplicates in {ids.tolist()[:32]}")
    setattr(ids, _VALIDATED, stamp)
    return ids
