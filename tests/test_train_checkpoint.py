"""Checkpoints resume exactly: a run stopped, restored into fresh objects and continued ends
bitwise equal to an uninterrupted run; writes are atomic and files are safetensors/JSON only."""

import json
import math
import random

import numpy as np
import pytest
import torch

from jomed_fast.train import (
    NonFiniteLossError,
    WarmupCosine,
    check_finite,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    save_named,
    warmup_cosine,
)

STEPS, STOP = 12, 5


def make_run(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Dropout(0.3), torch.nn.Linear(8, 3))
    params = dict(model.named_parameters())
    opt = torch.optim.AdamW(params.values(), lr=1e-2, weight_decay=0.01)
    sched = warmup_cosine(opt, STEPS)
    gen = torch.Generator().manual_seed(123)
    return model, params, opt, sched, gen


def step(model, opt, sched, gen):
    # every RNG the checkpoint restores is drawn from: the data generator, torch's global RNG
    # (dropout), Python's and numpy's
    x = torch.randn(4, 6, generator=gen) + random.random() + float(np.random.rand())
    loss = model(x).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()


def test_resume_is_bitwise_identical(tmp_path):
    random.seed(1), np.random.seed(1)
    model, params, opt, sched, gen = make_run()
    for _ in range(STEPS):
        step(model, opt, sched, gen)
    expected = {k: v.detach().clone() for k, v in params.items()}

    random.seed(1), np.random.seed(1)
    model, params, opt, sched, gen = make_run()
    for i in range(STOP):
        step(model, opt, sched, gen)
        save_checkpoint(
            tmp_path,
            i + 1,
            params=params,
            optimizer=opt,
            scheduler=sched,
            generators={"data": gen},
            data={"position": i + 1},
            extra={"best": 0.5},
            keep=2,
        )
    # a fresh process: other seeds, other initial weights
    random.seed(99), np.random.seed(99)
    model, params, opt, sched, gen = make_run(seed=7)
    path = latest_checkpoint(tmp_path)
    assert path.name == f"step-{STOP:08d}"
    state = load_checkpoint(path, params=params, optimizer=opt, scheduler=sched, generators={"data": gen})
    assert state == {"step": STOP, "data": {"position": STOP}, "extra": {"best": 0.5}}
    for _ in range(STEPS - STOP):
        step(model, opt, sched, gen)
    for k, v in params.items():
        assert torch.equal(v, expected[k]), k


def test_keep_prunes_old_steps_but_not_named(tmp_path):
    _model, params, opt, _sched, _gen = make_run()
    for s in range(1, 5):
        save_checkpoint(tmp_path, s, params=params, optimizer=opt, keep=2)
    save_named(tmp_path, "best", 3, params=params, optimizer=opt)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["LATEST", "best", "step-00000003", "step-00000004"]
    for f in (tmp_path / "checkpoints" / "best").iterdir():
        assert f.suffix in (".safetensors", ".json")
    json.loads((tmp_path / "checkpoints" / "best" / "state.json").read_text())


def test_a_failed_write_leaves_the_previous_checkpoint(tmp_path):
    _model, params, opt, _sched, _gen = make_run()
    save_checkpoint(tmp_path, 1, params=params, optimizer=opt)
    with pytest.raises(TypeError, match="not JSON-serialisable"):
        save_checkpoint(tmp_path, 2, params=params, optimizer=opt, extra={"bad": object()})
    assert latest_checkpoint(tmp_path).name == "step-00000001"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["LATEST", "step-00000001"]


def test_errors_name_the_argument(tmp_path):
    _model, params, opt, sched, gen = make_run()
    assert latest_checkpoint(tmp_path) is None
    path = save_checkpoint(tmp_path, 1, params=params, optimizer=opt)
    with pytest.raises(ValueError, match="params:"):
        load_checkpoint(path, params={"other": torch.zeros(2)})
    with pytest.raises(ValueError, match="scheduler:"):
        load_checkpoint(path, params=params, scheduler=sched)
    with pytest.raises(ValueError, match="generators:"):
        load_checkpoint(path, params=params, generators={"data": gen})
    with pytest.raises(ValueError, match="keep:"):
        save_checkpoint(tmp_path, 2, params=params, optimizer=opt, keep=0)
    with pytest.raises(ValueError, match="name:"):
        save_named(tmp_path, "step-00000001", 1, params=params, optimizer=opt)
    with pytest.raises(ValueError, match="path:"):
        load_checkpoint(tmp_path, params=params)


def test_warmup_cosine_matches_transformers():
    from transformers import get_cosine_schedule_with_warmup

    for total, ratio in [(10, 0.1), (37, 0.1), (5, 0.0), (100, 0.25)]:
        ours = WarmupCosine(total, ratio)
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        ref = get_cosine_schedule_with_warmup(opt, math.ceil(ratio * total), total)
        for t in range(total + 1):
            assert ours(t) == pytest.approx(ref.lr_lambdas[0](t), abs=1e-12), (total, ratio, t)
    with pytest.raises(ValueError, match="total_steps"):
        WarmupCosine(0)
    with pytest.raises(ValueError, match="warmup_ratio"):
        WarmupCosine(10, 1.0)


def test_non_finite_loss_stops_with_the_checkpoint_named():
    check_finite(torch.tensor(1.5), 3)
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(NonFiniteLossError, match=r"step 7.*ckpt/step-00000006"):
            check_finite(torch.tensor(bad), 7, "ckpt/step-00000006")
