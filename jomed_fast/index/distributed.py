r"""torch.distributed plumbing for the sharded index build (any backend; tested with gloo on CPU).

A build on W ranks: every rank opens the same ``out_dir`` (a shared file system), rank r embeds
the chunks :math:`c` with :math:`c \bmod W = r` and writes them to ``out_dir/chunks``; a barrier;
rank 0 assembles the final files and the manifest; a barrier; every rank opens the result.

Collectives go through :class:`Group`, which also keeps the ranks in step on failure: each step
runs under :meth:`Group.run_all`, which all-reduces an "ok" flag, so a rank that raises makes every
other rank raise too instead of leaving them blocked in the next barrier.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


class RankFailed(RuntimeError):
    """Raised on the ranks that did not fail when another rank's step raised."""


class Group:
    """The ranks taking part in a build: ``rank`` in ``0..world-1``; a 1-rank group is a no-op."""

    def __init__(self, enabled: bool):
        import torch.distributed as dist

        self.enabled = enabled
        self.rank = dist.get_rank() if enabled else 0
        self.world = dist.get_world_size() if enabled else 1
        # NCCL reduces CUDA tensors only; gloo (and "cpu:gloo,cuda:nccl") take CPU tensors
        self.device = torch.device("cpu")
        if enabled and dist.get_backend() == "nccl":
            self.device = torch.device("cuda", torch.cuda.current_device())

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def all_ok(self, ok: bool) -> bool:
        """True on every rank iff ``ok`` is true on every rank (all-reduce MIN; also a barrier)."""
        if not self.enabled:
            return ok
        import torch.distributed as dist

        flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def run_all(self, fn: Callable[[], T], what: str) -> T:
        """Run ``fn`` on every rank; if it raised anywhere, raise everywhere (the original error on
        the failing rank, :class:`RankFailed` on the others)."""
        err: BaseException | None = None
        result = None
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - re-raised below, after the other ranks know
            err = e
        if not self.all_ok(err is None):
            if err is not None:
                raise err
            raise RankFailed(
                f"{what}: failed on another rank (its error is in that rank's output); rank {self.rank} stops too"
            )
        return result  # type: ignore[return-value]

    def check_same(self, name: str, payload: str) -> None:
        """Raise ``ValueError`` on every rank unless ``payload`` is identical on all ranks."""
        if not self.enabled:
            return
        import torch.distributed as dist

        digest = torch.tensor(list(hashlib.sha256(payload.encode()).digest()), dtype=torch.uint8, device=self.device)
        got = [torch.empty_like(digest) for _ in range(self.world)]
        dist.all_gather(got, digest)
        odd = [r for r, d in enumerate(got) if not torch.equal(d, got[0])]
        if odd:
            raise ValueError(
                f"{name}: expected the same on all {self.world} ranks, got a different value on "
                f"rank(s) {odd} than on rank 0 (this rank: {self.rank}: {payload[:200]})"
            )


def resolve_group(distributed: bool | None) -> Group:
    """``None``: use the default process group when one is initialised with more than one rank;
    ``True``: require one; ``False``: single process."""
    if distributed not in (None, True, False):
        raise TypeError(f"distributed: expected None, True or False, got {distributed!r}")
    import torch.distributed as dist

    ready = dist.is_available() and dist.is_initialized()
    if distributed is True and not ready:
        raise ValueError(
            "distributed: expected an initialised torch.distributed process group "
            "(torch.distributed.init_process_group, or launch with torchrun), got none"
        )
    if distributed is False or not ready:
        return Group(False)
    return Group(dist.get_world_size() > 1 or distributed is True)
