"""glibc's malloc kept from unmapping DETA's large CPU tensors after each use.

glibc serves an allocation above its mmap threshold (adaptive, at most 32 MiB on 64-bit systems) with a
fresh mapping and unmaps it on free, so every use of such a tensor page-faults on each of its 4 KiB pages
again. From batch 2 at 800x1333, or one 1200x2000 image, the encoder's (tokens, 256) activations and the
backbone's feature maps are above it: a forward pass then spends seconds in the kernel (1.2 million page
faults and 4 s of system time for 2 images of 800x1333 on 2 cores, against 0.1 million and 0.3 s once kept).
Served from the heap and kept after free, the same memory is reused without faults. The price: the process
keeps its peak memory instead of returning it between calls.
"""
import ctypes
import ctypes.util
import platform

# mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
_LARGEST_KEPT = 2**30  # allocations up to 1 GiB come from the heap
_TRIM_ABOVE = 2**31 - 1  # free memory at the heap's top returns to the system only above 2 GiB (int max)


def keep_freed_memory() -> bool:
    """Make this process's glibc malloc serve large blocks from the heap and keep them after free.

    Process-wide and lasting; main.py, predict.py and the benchmark call it for CPU runs. Returns whether it
    applied (False where the C library is not glibc).
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    # Where glibc refuses a threshold that high (older releases cap it at 32 MiB), mmap is switched off instead.
    kept = libc.mallopt(_M_MMAP_THRESHOLD, _LARGEST_KEPT) or libc.mallopt(_M_MMAP_MAX, 0)
    return bool(kept and libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_ABOVE))
