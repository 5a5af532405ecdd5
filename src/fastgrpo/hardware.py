"""What the machine's processors can do fast, where a setting depends on it (bf16 autocast on CPU)."""

import functools
import os
import sys

# x86 flags of a bf16 matrix unit. Without one, torch computes a bf16 matmul in a slow generic path:
# on a 2-core AMD EPYC (Zen 3, AVX2 only) 0.84 GFLOP/s in bf16 against 90 in float32, where an Intel CPU
# with AMX ran bf16 about 4x faster than float32.
FAST_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo); empty elsewhere, where nothing is assumed."""
    if not sys.platform.startswith("linux"):
        return frozenset()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_fast_bf16() -> bool:
    return any(flag in cpu_flags() for flag in FAST_BF16_FLAGS)


def bf16_is_fast(use_cpu: bool) -> bool:
    """Whether bf16 autocast speeds up training on the device the trainer uses."""
    import torch

    if not use_cpu:
        # Without a GPU the trainer runs on the CPU anyway, but transformers refuses bf16 there unless
        # use_cpu=True ("Your setup doesn't support bf16/gpu"): float32, and the config still constructs.
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return cpu_has_fast_bf16()


def usable_cores() -> list[int]:
    """The CPU cores this process may run on. Linux says which (its affinity mask, which containers and
    `taskset` narrow); elsewhere (macOS, Windows) there is no such call, and every core counts."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def pin_to_cores(cores: list[int]) -> list[int] | None:
    """Pin this process to `cores` (children inherit it); returns the previous cores, to restore. Linux only."""
    if not hasattr(os, "sched_setaffinity"):
        raise RuntimeError(f"pinning to CPU cores {cores} needs Linux (os.sched_setaffinity); on {sys.platform} "
                           "run without cpu_cores")
    previous = usable_cores()
    os.sched_setaffinity(0, cores)
    return previous


# glibc returns every freed block above 128 KiB (after dynamic growth, up to 32 MiB) to the kernel, so each
# micro-step's activations, whose shapes change with the completions, are faulted in page by page again.
# Keeping freed memory in the heap instead: a B1 forward and backward on 2 cores (Intel Xeon with AMX) took
# 6.56 and 6.63 s against 6.84, 6.71 and 6.96 s, with 1.7-1.8 million minor page faults against 5.0-5.9
# (bench in the README). The heap then stays at its peak, which the next micro-step needs anyway.
MALLOC_MMAP_THRESHOLD = 1 << 30  # blocks below 1 GiB come from the heap
MALLOC_TRIM_THRESHOLD = 1 << 34  # the heap is not given back below 16 GiB free at its top


@functools.cache
def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed memory for reuse (see above). Linux with glibc only; once per process.
    FASTGRPO_KEEP_FREED_MEMORY=0 turns it off (a trainer that shares its machine's memory tightly)."""
    if not sys.platform.startswith("linux") or os.environ.get("FASTGRPO_KEEP_FREED_MEMORY", "1") == "0":
        return False
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # musl and others: their own allocators
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's mallopt parameter numbers
    return bool(libc.mallopt(m_mmap_threshold, MALLOC_MMAP_THRESHOLD)
                and libc.mallopt(m_trim_threshold, MALLOC_TRIM_THRESHOLD))
