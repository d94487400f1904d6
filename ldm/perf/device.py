"""Timing and peak memory of work on a device: CUDA's allocator statistics on a GPU, the process's resident set
(Linux /proc) on the host."""
import time

import torch


def cuda(device):
    return torch.device(device).type == "cuda"


def reset_peak(device):
    """Start a new peak of the host's resident set and, on a GPU, of CUDA's allocations."""
    if cuda(device):
        torch.cuda.reset_peak_memory_stats(device)
    try:  # "5" resets the peak resident set to the current one; where it is refused the peak is the process's
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_mb(device):
    """MiB: CUDA max allocated since the last reset, or the host's peak resident set (libraries included)."""
    return torch.cuda.max_memory_allocated(device) / 2**20 if cuda(device) else host_mb("VmHWM:")


def host_mb(field):
    """MiB of a /proc/self/status field: "VmRSS:" the current resident set, "VmHWM:" its peak."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) / 1024


def synchronize(device):
    if cuda(device):
        torch.cuda.synchronize(device)


def timed(fn, n, device):
    """Seconds of `n` back-to-back calls of `fn()` with one synchronisation at the end (a sync after every call
    would hide the overlap of Python with the GPU that a training loop has)."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(n):
        fn()
    synchronize(device)
    return time.perf_counter() - start


def measure_step(step, device, steps, warmup):
    """`warmup` untimed calls of `step()` (they fill caches, tune cuDNN, compile), then the mean time and the peak
    memory of `steps` more."""
    warmup_s = timed(step, warmup, device)
    reset_peak(device)
    step_s = timed(step, steps, device) / steps
    return {"step_s": step_s, "peak_mb": peak_mb(device), "warmup_s": warmup_s, "steps": steps, "warmup": warmup}
