"""Distributed training through PyTorch itself.

CPU: gloo process group; parameters broadcast from rank 0 at start and gradients averaged
with all_reduce after every backward (what DDP does, without its one-forward-per-backward
restriction, which self-forcing rollouts break). GPU: NCCL and FSDP2 (``fully_shard`` on
every block, then the root), which reduces gradients itself; ``STREAMGEN_FSDP=1`` runs FSDP2
on CPU/gloo too (tests). Single process: no-ops.

FSDP2 runs checkpoint with ``torch.distributed.checkpoint`` (torchtitan's habit): every rank
writes its own shards of the models, optimizers and EMA into ``ckpt/step-XXXXXXXX/`` (no
gathered copy), plus its RNG state; :func:`save_sharded` / :func:`load_sharded` /
:func:`latest_sharded`. Other runs keep the single-file checkpoints of ``checkpointing``.
"""
from __future__ import annotations

import os
import re
import shutil

import torch
import torch.distributed as dist

SHARDED = re.compile(r"^step-(\d+)$")


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
        self.fsdp = self.world > 1 and (self.device.type == "cuda" or os.environ.get("STREAMGEN_FSDP") == "1")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        """Move to the device; on multi-GPU shard with FSDP2, on CPU broadcast rank 0's weights."""
        model = model.to(self.device)
        if self.world == 1:
            return model
        if self.fsdp:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard
            mesh = init_device_mesh(self.device.type, (self.world,))
            for blk in getattr(model, "blocks", []):
                fully_shard(blk, mesh=mesh)
            fully_shard(model, mesh=mesh)
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


def full_tensor(v: torch.Tensor) -> torch.Tensor:
    """A plain CPU copy of ``v``; an FSDP2 DTensor shard is gathered first (a collective: every
    rank must call it)."""
    if hasattr(v, "full_tensor"):
        v = v.full_tensor()
    return v.detach().cpu().clone()


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A plain CPU state dict (gathers FSDP2 DTensors)."""
    return {k: full_tensor(v) for k, v in model.state_dict().items()}


# ------------------------------------------------------------------ sharded (DCP) checkpoints
def _dcp_state(stage, rank: int) -> dict:
    """The stage's resumable state as DCP wants it: sharded model/optimizer state dicts (DTensors
    stay sharded), the EMA shards, and this rank's RNG state under a per-rank key."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    state = {f"model.{n}": get_model_state_dict(m) for n, m in stage.mods.items()}
    state.update({f"optim.{n}": get_optimizer_state_dict(stage.mods[n], o) for n, o in stage.opts.items()})
    if stage.ema is not None:
        state["ema"] = dict(stage.ema)
    state[f"rng_cpu.rank{rank}"] = torch.get_rng_state()
    if torch.cuda.is_available():
        state[f"rng_cuda.rank{rank}"] = torch.cuda.get_rng_state()
    return state


def save_sharded(folder: str, step: int, stage, d: Dist, keep: int = 2) -> str:
    """Every rank writes its shards of ``stage`` to ``folder/step-XXXXXXXX/`` (written under a
    temporary name, renamed by rank 0 once all ranks finished); the ``keep`` newest stay."""
    import torch.distributed.checkpoint as dcp
    path = os.path.join(folder, f"step-{step:08d}")
    tmp = path + ".tmp"
    if d.main:
        os.makedirs(folder, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    d.barrier()
    state = _dcp_state(stage, d.rank)
    state["step"] = torch.tensor(step)
    dcp.save(state, checkpoint_id=tmp)
    d.barrier()
    if d.main:
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
        for old in list_sharded(folder)[:-keep]:
            shutil.rmtree(os.path.join(folder, f"step-{old:08d}"), ignore_errors=True)
    d.barrier()
    return path


def list_sharded(folder: str) -> list[int]:
    """Steps of the complete sharded checkpoints in ``folder``, oldest first."""
    if not os.path.isdir(folder):
        return []
    return sorted(int(m.group(1)) for n in os.listdir(folder)
                  if (m := SHARDED.match(n)) and os.path.exists(os.path.join(folder, n, ".metadata")))


def latest_sharded(folder: str) -> str | None:
    steps = list_sharded(folder)
    return os.path.join(folder, f"step-{steps[-1]:08d}") if steps else None


def load_sharded(path: str, stage, d: Dist) -> int:
    """Load a :func:`save_sharded` checkpoint into ``stage`` in place (each rank reads its own
    shards and RNG state); returns the step it was saved at."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict
    state = _dcp_state(stage, d.rank)
    state["step"] = torch.tensor(0)
    dcp.load(state, checkpoint_id=path)
    for n, m in stage.mods.items():
        set_model_state_dict(m, state[f"model.{n}"])
    for n, o in stage.opts.items():
        set_optimizer_state_dict(stage.mods[n], o, state[f"optim.{n}"])
    torch.set_rng_state(state[f"rng_cpu.rank{d.rank}"])
    if torch.cuda.is_available():
        torch.cuda.set_rng_state(state[f"rng_cuda.rank{d.rank}"])
    return int(state["step"])
