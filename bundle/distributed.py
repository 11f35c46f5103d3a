"""Distributed data-parallel training under torchrun (``configs/multi_gpu_train.yaml``).

One process per device, started by ``torchrun`` (which sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE`` and the
rendezvous). Each rank trains on its own shard of every epoch (``DistributedSampler``); DDP averages the gradients
over ranks in the backward pass, so after every step the parameters are the same on all ranks and equal those of one
process trained on the union of the ranks' batches (for losses that are means over images):

    grad = (1 / W) * sum_r grad L_r        (W ranks, L_r the loss of rank r's batch)

Validation metrics are gathered over ranks by MONAI's metric handlers. MLflow, checkpoints, export and the end-of-run
summary run on rank 0 only. The backend is ``nccl`` on GPUs and ``gloo`` on CPUs.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_rank_zero() -> bool:
    return rank() == 0


def local_device() -> torch.device:
    """``cuda:LOCAL_RANK`` when GPUs are present, else the CPU."""
    if torch.cuda.is_available():
        return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    return torch.device("cpu")


def init(backend: str | None = None) -> torch.device:
    """Join the process group torchrun set up (``nccl`` on GPU, ``gloo`` on CPU unless ``backend`` says) and return
    this rank's device. Outside torchrun it says how to start the job."""
    missing = [k for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(
            f"configs/multi_gpu_train.yaml runs under torchrun, which sets {', '.join(missing)}: start it with "
            "torchrun --nproc_per_node=N -m monai.bundle run training --config_file "
            "\"['configs/train.yaml','configs/multi_gpu_train.yaml']\" (README: 'Several GPUs')"
        )
    device = local_device()
    if not is_distributed():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend or ("nccl" if device.type == "cuda" else "gloo"))
    # Ignite builds its own view of the group (a collective new_group) on first use, e.g. when rank 0 alone builds a
    # CheckpointSaver: build it here, on every rank at once
    import ignite.distributed as idist

    idist.sync()
    logger.info("rank %d of %d on %s (%s)", rank(), world_size(), device, dist.get_backend())
    return device


def finalize() -> None:
    """Leave the process group (``finalize`` of the overlay), all ranks together: rank 0 still runs its own
    end-of-run handlers (state, export, MLflow) after the others are done, and a rank that tears its gloo connections
    down meanwhile can abort ("terminate called without an active exception", seen once in the two-rank test)."""
    if is_distributed():
        dist.barrier()
        dist.destroy_process_group()


def rank_zero_first(fn: Callable, *args, **kwargs) -> Any:
    """``fn(*args, **kwargs)`` on rank 0, then on the other ranks (e.g. generate data once, then read it)."""
    if not is_distributed():
        return fn(*args, **kwargs)
    if is_rank_zero():
        out = fn(*args, **kwargs)
    dist.barrier()
    if not is_rank_zero():
        out = fn(*args, **kwargs)
    return out


def sampler(dataset, shuffle: bool = True, even_divisible: bool = True, what: str = "training"):
    """MONAI's ``DistributedSampler`` over ``dataset`` for this rank, after checking that every rank gets at least
    one item (training: ``even_divisible`` pads the last round so ranks step together; validation: no padding, the
    metric handlers gather uneven shards)."""
    from monai.data import DistributedSampler

    n, w = len(dataset), world_size()
    if n < w:
        raise ValueError(f"{w} processes (torchrun --nproc_per_node x nodes) for {n} {what} items: each rank needs at "
                         f"least one item; use at most {n} processes or more data")
    return DistributedSampler(dataset, even_divisible=even_divisible, shuffle=shuffle)
