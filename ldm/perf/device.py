"""Timing and peak memory of work on a device: one synchronisation per timed run; CUDA's allocator statistics on a
GPU, the process's peak resident set on the host."""
import resource
import time

import torch


def reset_peak(device):
    """Start a new peak; False where the platform cannot reset it (the next reading is then the process's peak)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    return reset_host_peak()


def peak_mb(device):
    """MiB: CUDA max allocated since the last reset, or the host's peak resident set (weights and libraries included)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return host_peak_mb()


def reset_host_peak():
    try:  # Linux: "5" resets the peak resident set size to the current one
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def host_peak_mb():
    return _status_mb("VmHWM:") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def host_current_mb():
    return _status_mb("VmRSS:")


def _status_mb(field):
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field)) / 1024
    except (OSError, StopIteration):
        return None


def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed_steps(step, n, device):
    """Mean seconds per call over `n` back-to-back calls of `step()`, one synchronisation at the end (a sync after
    every call would hide the overlap of Python with the GPU that a training loop has)."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(n):
        step()
    synchronize(device)
    return (time.perf_counter() - start) / n


def measure_step(step, device, steps, warmup):
    """{"step_s", "peak_mb", "warmup_s", "steps", "warmup"} of `step()`: `warmup` untimed calls (they fill caches,
    tune cuDNN, compile), then `timed_steps` over `steps` calls with the peak memory of those calls alone."""
    start = time.perf_counter()
    for _ in range(warmup):
        step()
    synchronize(device)
    warmup_s = time.perf_counter() - start
    reset_peak(device)
    step_s = timed_steps(step, steps, device)
    return {"step_s": step_s, "peak_mb": peak_mb(device), "warmup_s": warmup_s, "steps": steps, "warmup": warmup}
