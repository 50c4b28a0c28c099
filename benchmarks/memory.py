"""Peak memory of a stretch of work: CUDA's tensor allocator, or the process's resident set.

On CPU the kernel's high-water mark of the resident set (``VmHWM``) is reset through
``/proc/self/clear_refs`` (Linux >= 4.0) at the start and read at the end. Run with
``MALLOC_MMAP_THRESHOLD_=131072`` so that glibc returns freed tensor memory at once and the
resident set follows the tensors rather than the allocator's history (``micro`` does this).
"""

from __future__ import annotations

import pathlib

import torch


def _status_bytes(field: str) -> int:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}: CPU memory measurement needs Linux")


class PeakMemory:
    """``start()`` then ``peak_mb()``: the peak above the memory in use at ``start()``."""

    def __init__(self, device: torch.device):
        self.device, self.before = device, 0

    def start(self) -> None:
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
