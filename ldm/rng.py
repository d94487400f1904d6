"""The process's global random states (torch CPU and CUDA, numpy, Python `random`) as a checkpoint can hold them:
Lightning's own collector returns numpy's state as an ndarray, which `torch.load(weights_only=True)` refuses (and
--resume loads checkpoints that way); here every state is tensors and plain Python values."""
import warnings

import torch
from lightning_fabric.utilities.seed import _collect_rng_states, _set_rng_states


def collect_rng_states():
    # A process that never used CUDA has nothing to save there (its CUDA streams are still as seeded), and asking
    # would start CUDA in a CPU run on a machine with GPUs.
    states = _collect_rng_states(include_cuda=torch.cuda.is_initialized())
    states.setdefault("torch.cuda", [])
    name, keys, *rest = states["numpy"]
    states["numpy"] = [name, torch.from_numpy(keys.copy()), *rest]
    return states


def restore_rng_states(states):
    """Set the global random states from `collect_rng_states()`'s dict (as loaded from a checkpoint)."""
    states = dict(states)
    name, keys, *rest = states["numpy"]
    states["numpy"] = (name, keys.numpy(), *rest)
    cuda = states.pop("torch.cuda", [])
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if len(cuda) == count:
        states["torch.cuda"] = cuda
    elif cuda:
        # A run moved to a machine with another number of GPUs cannot continue their streams; it still trains.
        warnings.warn(f"the checkpoint holds the random states of {len(cuda)} CUDA device(s), this machine has {count}: "
                      "CUDA random numbers after resuming differ from an uninterrupted run")
    _set_rng_states(states)
