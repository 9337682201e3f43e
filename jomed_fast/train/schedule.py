r"""Learning-rate schedule shared by both stages: linear warm-up, then cosine decay to zero.

.. math::
    \eta(t) = \eta_0 \cdot \begin{cases} t / W & t < W \\
        \tfrac12 \big(1 + \cos(\pi \, \tfrac{t - W}{T - W})\big) & W \le t \le T \end{cases}
    \qquad W = \lceil r_{warm} T \rceil \text{ or } \min(W_{steps}, T)

(stage 1: the reference's LLaMA-Factory setting, ``cosine`` with ``warmup_ratio = 0.1``; stage 2:
the reference's ``--warmup_steps``; the same convention as transformers'
``get_cosine_schedule_with_warmup``). The schedule is a callable object whose
attributes are plain numbers, so ``LambdaLR.state_dict()`` stays JSON for checkpoints.
"""

from __future__ import annotations

import math

import torch

from .._checks import check_int

__all__ = ["WarmupCosine", "warmup_cosine"]


class WarmupCosine:
    """``step -> multiplier`` of the base learning rate (see the module docstring)."""

    def __init__(self, total_steps: int, warmup_ratio: float = 0.1, warmup_steps: int | None = None):
        if total_steps < 1:
            raise ValueError(f"total_steps: expected >= 1, got {total_steps}")
        if not 0.0 <= warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio: expected a float in [0, 1), got {warmup_ratio}")
        check_int("warmup_steps", warmup_steps, 0, optional=True, expected="None or an int >= 0")
        self.total_steps = int(total_steps)
        self.warmup_steps = (
            math.ceil(warmup_ratio * total_steps) if warmup_steps is None else min(warmup_steps, self.total_steps)
        )

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return step / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float = 0.1, warmup_steps: int | None = None
):
    """A ``LambdaLR`` over ``optimizer`` following :class:`WarmupCosine`."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(total_steps, warmup_ratio, warmup_steps))
