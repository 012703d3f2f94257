"""Distributed training through PyTorch itself.

CPU: gloo process group; parameters broadcast from rank 0 at start and gradients averaged
with all_reduce after every backward (what DDP does, without its one-forward-per-backward
restriction, which self-forcing rollouts break). GPU: NCCL and FSDP2 (``fully_shard`` on
every block, then the root), which reduces gradients itself. Single process: no-ops.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


class Dist:
    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = torch.device("cpu")
        self.fsdp = False
        if torch.cuda.is_available():
            self.device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(self.device)
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        self.fsdp = self.world > 1 and self.device.type == "cuda"

    @property
    def main(self) -> bool:
        return self.rank == 0

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        """Move to the device; on multi-GPU shard with FSDP2, on CPU broadcast rank 0's weights."""
        model = model.to(self.device)
        if self.world == 1:
            return model
        if self.fsdp:
            from torch.distributed.fsdp import fully_shard
            for blk in getattr(model, "blocks", []):
                fully_shard(blk)
            fully_shard(model)
            return model
        with torch.no_grad():
            for t in list(model.parameters()) + list(model.buffers()):
                dist.broadcast(t.data, 0)
        return model

    def sync_grads(self, model: torch.nn.Module):
        """Average gradients across ranks (CPU/gloo path; FSDP2 already did it)."""
        if self.world == 1 or self.fsdp:
            return
        for p in model.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad.div_(self.world)

    def mean(self, value: float) -> float:
        if self.world == 1:
            return value
        t = torch.tensor([float(value)], device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t)
        return float(t.item()) / self.world

    def barrier(self):
        if self.world > 1:
            dist.barrier()

    def close(self):
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A plain CPU state dict (gathers FSDP2 DTensors)."""
    out = {}
    for k, v in model.state_dict().items():
        if hasattr(v, "full_tensor"):
            v = v.full_tensor()
        out[k] = v.detach().cpu().clone()
    return out
