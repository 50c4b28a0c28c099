"""Peak memory of a stretch of work: CUDA's tensor allocator, or the process's resident set.

On CPU the kernel's high-water mark of the resident set (``VmHWM``) is reset through
``/proc/self/clear_refs`` (Linux >= 4.0) at the start and read at the end. A fixed
glibc mmap threshold (``MALLOC_MMAP_THRESHOLD_=131072``, also set at ``start()`` through
``mallopt``) makes freed tensors above 128 KiB return to the system at once, so the resident set
follows the tensors rather than the allocator's history; smaller tensors come from reused heap
memory and barely show.
"""

from __future__ import annotations

import contextlib
import ctypes
import pathlib

import torch


def _status_bytes(field: str) -> int:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}: CPU memory measurement needs Linux")


def _fixed_mmap_threshold() -> None:
    """What ``MALLOC_MMAP_THRESHOLD_=131072`` does, for a process already running (glibc only)."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").mallopt(-3, 131072)  # M_MMAP_THRESHOLD


class PeakMemory:
    """``start()`` then ``peak_mb()``: the peak above the memory in use at ``start()``."""

    def __init__(self, device: torch.device):
        self.device, self.before = device, 0

    def start(self) -> None:
        _fixed_mmap_threshold()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
        else:
            pathlib.Path("/proc/self/clear_refs").write_text("5")
            self.before = _status_bytes("VmRSS")

    def peak_mb(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return (torch.cuda.max_memory_allocated(self.device) - self.before) / 2**20
        return (_status_bytes("VmHWM") - self.before) / 2**20
