"""What the networks need from the host to run at the CPU's speed (measured: bench/sampling_speed.py,
README "Where the time goes").

- **Memory**: every layer of a UNet evaluation allocates its activation anew. Tensors above glibc's
  mmap threshold (at most 32 MiB; a batch of 12 view images of 248 × 256 at 16 channels is 48 MiB)
  are mapped from the kernel and unmapped when freed, so each layer of each evaluation pays page
  faults for fresh zeroed pages: the kernel's share of a sampling run was as large as the
  arithmetic (sys ≈ user time). ``keep_freed_memory`` has glibc serve large blocks from the heap
  and keep what is freed for the next evaluation (``mallopt``; a no-op where the C library is not
  glibc). The cost: the process keeps its peak heap instead of returning it between evaluations.
- **Layout**: oneDNN's convolutions run faster on channels-last tensors (``channels_last``).
"""

from __future__ import annotations

import ctypes
import ctypes.util

import torch

#: glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
#: freed heap memory kept for reuse before glibc returns the top of the heap to the kernel
TRIM_THRESHOLD = 1 << 30
_configured: bool | None = None


def keep_freed_memory() -> bool:
    """Serve large allocations from the heap and keep freed memory for reuse (once per process);
    True where glibc accepted it."""
    global _configured
    if _configured is None:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            mallopt = libc.mallopt
        except (OSError, AttributeError):
            _configured = False
        else:
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            _configured = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _configured


def prepare(dev: torch.device, *nets) -> None:
    """Before evaluating ``nets`` on ``dev``: on the CPU, the allocator setting and channels-last
    weights (a no-op on CUDA, where the caching allocator already reuses memory)."""
    if dev.type != "cpu":
        return
    keep_freed_memory()
    for n in nets:
        if n is not None:
            n.to(memory_format=torch.channels_last)


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """``x`` in channels-last layout on the CPU (4-D tensors), unchanged elsewhere."""
    if x.device.type == "cpu" and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x
