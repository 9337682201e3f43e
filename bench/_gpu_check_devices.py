"""The GPUs the check knows and the roofline model.

* :class:`Device`, :data:`DEVICES`, :func:`lookup_device`: peak DRAM bandwidth and dense fp16
  tensor-core FLOP/s of each, found from ``torch.cuda.get_device_name()``; :func:`device_slug`
  names its report files.
* Roofline: a call that moves ``b`` bytes and does ``f`` FLOPs takes at least
  ``t_floor = max(b / bandwidth, f / flops)`` (:func:`floor_seconds`); a measured time ``t``
  reaches the fraction ``b / t / bandwidth`` of the memory-bandwidth roofline
  (:func:`bandwidth_fraction`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Device:
    """A GPU's peaks: DRAM ``bandwidth`` in bytes/s, dense fp16 tensor-core ``flops`` per s, ``memory`` bytes."""

    name: str
    bandwidth: float
    flops: float
    memory: float


DEVICES = {
    d.name: d
    for d in (
        Device("L40", 864e9, 181e12, 48e9),
        Device("L40S", 864e9, 362e12, 48e9),
        Device("H100 SXM", 3350e9, 989e12, 80e9),
        Device("H100 PCIe", 2000e9, 756e12, 80e9),
        Device("H200", 4800e9, 989e12, 141e9),
        Device("A100 80GB", 2039e9, 312e12, 80e9),
        Device("RTX 4090", 1008e9, 165e12, 24e9),
    )
}
# (words all present, words none present) in the upper-cased CUDA name -> table entry; first match wins.
# "NVIDIA H100 80GB HBM3" is the SXM part; the NVL and 40 GB A100 have other peaks, so they are unknown.
_NAME_RULES = (
    (("L40S",), (), "L40S"),
    (("L40",), (), "L40"),
    (("H200",), (), "H200"),
    (("H100", "PCIE"), (), "H100 PCIe"),
    (("H100",), ("NVL", "PCIE"), "H100 SXM"),
    (("A100", "80GB"), (), "A100 80GB"),
    (("4090",), (), "RTX 4090"),
)


def lookup_device(cuda_name: str) -> Device | None:
    """The table's entry for a ``torch.cuda.get_device_name()`` string, or None for a GPU it does not hold."""
    words = set(re.split(r"[\s_-]+", cuda_name.upper()))
    for present, absent, name in _NAME_RULES:
        if all(w in words for w in present) and not any(w in words for w in absent):
            return DEVICES[name]
    return None


def device_slug(cuda_name: str) -> str:
    """A file name for a device: ``"NVIDIA H100 80GB HBM3"`` -> ``"h100-80gb-hbm3"``."""
    slug = re.sub(r"[^a-z0-9]+", "-", cuda_name.lower()).strip("-")
    slug = re.sub(r"^nvidia-", "", slug)
    if not slug:
        raise ValueError(f"cuda_name: expected a device name with letters or digits, got {cuda_name!r}")
    return slug


def floor_seconds(nbytes: float, flops: float, device: Device) -> float:
    """The roofline floor of one call: the larger of its memory time and its compute time."""
    return max(nbytes / device.bandwidth, flops / device.flops)


def bandwidth_fraction(nbytes: float, seconds: float, bandwidth: float) -> float:
    """The fraction of the memory-bandwidth roofline a call reached: ``nbytes / seconds / bandwidth``."""
    if not seconds > 0 or not bandwidth > 0:
        raise ValueError(f"seconds, bandwidth: expected both > 0, got {seconds} and {bandwidth}")
    return nbytes / seconds / bandwidth
