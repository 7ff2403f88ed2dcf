"""torch.distributed for the torch engine: the process group `torchrun` describes (gloo on CPU, NCCL
on CUDA), and the three collectives data-parallel training needs. What is decided around them
(sharding, rank-0 writing, timeouts) is `mlx_clip/engine/distributed.py`'s."""

from __future__ import annotations

import datetime

import numpy as np
import torch
import torch.distributed as dist

from mlx_clip.engine.distributed import World, peer_lost


def join(world: World, device: torch.device, seconds: float) -> None:
    """Join the process group once; the timeout bounds every collective (gloo raises past it)."""
    if dist.is_initialized():
        return
    try:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=world.rank, world_size=world.size,
                                timeout=datetime.timedelta(seconds=seconds))
    except Exception as err:  # a rank that never came, an unreachable MASTER_ADDR
        raise peer_lost(world, "joining the process group", err) from None


def all_gather(tensor: torch.Tensor, world: World) -> torch.Tensor:
    """(B/n, D) on each rank -> (B, D), ranks in order; no gradient (the caller routes it)."""
    parts = [torch.empty_like(tensor) for _ in range(world.size)]
    try:
        dist.all_gather(parts, tensor.contiguous())
    except Exception as err:
        raise peer_lost(world, "all-gathering the embeddings", err) from None
    return torch.cat(parts)


def all_reduce_sum(tensors: list[torch.Tensor], world: World) -> None:
    """Sum `tensors` over the ranks in place, as one flat buffer (one collective, not one per tensor)."""
    if not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    try:
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    except Exception as err:
        raise peer_lost(world, "all-reducing the gradients", err) from None
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def rank_sum(values: np.ndarray, world: World, device: torch.device) -> np.ndarray:
    summed = torch.from_numpy(np.asarray(values, np.int64)).to(device)  # NCCL reduces CUDA tensors only
    try:
        dist.all_reduce(summed, op=dist.ReduceOp.SUM)
    except Exception as err:
        raise peer_lost(world, "agreeing on which images decode", err) from None
    return summed.cpu().numpy()


def any_rank(flag: bool, world: World, device: torch.device) -> bool:
    value = torch.tensor([int(flag)], dtype=torch.int32, device=device)  # NCCL reduces CUDA tensors only
    try:
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    except Exception as err:
        raise peer_lost(world, "agreeing on whether to stop", err) from None
    return bool(value.item())
