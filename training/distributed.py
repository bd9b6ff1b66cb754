"""Distributed training under torchrun: `torchrun --nproc-per-node N -m training train ...`.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR; `init_from_env` starts the process group (gloo on CPU,
nccl on GPU). The patient-weighted sampler stays one sampler: every rank draws the same global epoch order from the
same seed (models trained with 1 or N processes see the same frames in the same global batches), augments the whole
global batch with the shared random stream, and trains on its own share of each batch
(`local_share`); DistributedDataParallel averages the gradients, and the per-rank loss is scaled so that the
average is exactly the single-process batch mean whatever the split. Frozen-feature extraction and validation
logits are sharded across ranks and gathered (`sharded_rows`). Only rank 0 writes the model folder and the card; the
card records the world size.

What is not identical to one process on CPU: BatchNorm statistics are per process (SyncBatchNorm needs a GPU; on
GPU it is used), so an N-process run matches a one-process run with the same seed and global batch within a
tolerance, not bit for bit (tests/test_distributed.py states and checks it).
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size) of this process: (0, 1) outside torchrun."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_main() -> bool:
    return world()[0] == 0


def init_from_env(device: str = "cpu") -> bool:
    """Start the process group when launched by torchrun with more than one process; True when distributed."""
    if int(os.environ.get("WORLD_SIZE", 1)) <= 1 or not dist.is_available():
        return False
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") and torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend=backend)
    return True


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. writes a cache), the others then run it (and read what it wrote)."""
    if is_distributed() and not is_main():
        dist.barrier()
    yield
    if is_distributed() and is_main():
        dist.barrier()


def local_share(n: int) -> slice:
    """This rank's contiguous share of a global batch of n items (shares differ by at most one item)."""
    rank, size = world()
    bounds = np.linspace(0, n, size + 1).round().astype(int)
    return slice(int(bounds[rank]), int(bounds[rank + 1]))


def scale_local_loss(per_item_loss: torch.Tensor, global_batch: int) -> torch.Tensor:
    """The rank's loss such that DDP's gradient average equals the gradient of the global batch's mean loss:
    sum over the rank's items / global batch size x world size (DDP divides by world size)."""
    return per_item_loss.sum() * (world()[1] / max(global_batch, 1))


def wrap(model: torch.nn.Module, device: str = "cpu") -> torch.nn.Module:
    """DistributedDataParallel around the model (SyncBatchNorm on GPU); the model itself outside torchrun."""
    if not is_distributed():
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    if device.startswith("cuda"):
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return DDP(model, device_ids=[torch.cuda.current_device()])
    return DDP(model)


def sharded_rows(compute: Callable[[slice], np.ndarray], n: int) -> np.ndarray:
    """compute(rows) for rows 0..n-1, each rank computing a contiguous slice and all ranks gathering the whole, in
    order (frozen features, validation logits: pure functions of the frames, so sharding changes nothing but speed).
    A slice, not an index array: the caller's tensors are viewed, never copied. Outside torchrun: compute(0..n)."""
    if not is_distributed():
        return compute(slice(0, n))
    local = compute(local_share(n))
    parts: list = [None] * world()[1]
    dist.all_gather_object(parts, local)
    return np.concatenate([p for p in parts if p is not None and len(p)], axis=0) if n else local
