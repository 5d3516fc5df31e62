"""Training on several processes with torch.distributed (``torchrun``), as nanoGPT does it.

    torchrun --standalone --nproc_per_node 4 -m nstm.train --task shakespeare --steps 2000
    torchrun --nnodes 2 --node_rank 0 --rdzv_backend c10d --rdzv_endpoint HOST:29500 \\
        --nproc_per_node 8 -m nstm.train --task shakespeare ...        # the same on each machine

``init()`` reads the rank and world size that torchrun sets (``nstm_kernels.settings.
distributed_env``), starts the process group (``nccl`` on CUDA, each process on the GPU of its
local rank; ``gloo`` on the CPU) and returns a ``Dist``; a plain ``python -m nstm.train`` gets a
``Dist`` of one process and no process group. ``wrap()`` puts the model in
``DistributedDataParallel`` or, with ``fsdp=True``, shards it with FSDP2 (``fully_shard`` on each
block, then on the whole model). ``nstm.train`` does the rest: one data stream per process and
micro-step, ``no_sync`` on the inner micro-steps of gradient accumulation, and only rank 0 logs,
evaluates (DDP; under FSDP every rank takes part in the evaluation's forwards, rank 0 reports) and
writes results and checkpoints. Checkpoints hold the full, unsharded model, so a single process
loads them (``nstm.checkpoint.load_model``, ``nstm-sample``, ``--resume`` with another world size
is refused: the data streams would not continue).
"""
from __future__ import annotations

import contextlib
import datetime
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as tdist
import torch.nn as nn

from nstm_kernels import settings


@dataclass
class Dist:
    """This process's place: ``rank`` of ``world`` processes, ``local_rank`` on its machine."""

    rank: int = 0
    local_rank: int = 0
    world: int = 1
    backend: Optional[str] = None            # "gloo" / "nccl"; None: a single process

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.backend is not None

    # -- collectives (no-ops for one process) ----------------------------------------------------
    def mean(self, values: List[float], device) -> List[float]:
        """The mean over processes of each value (NaN stays NaN)."""
        if not self.active:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=device)
        tdist.all_reduce(t)
        return (t / self.world).tolist()

    def any(self, flag: bool, device) -> bool:
        """True on every process when ``flag`` is True on any (a stop decision all must share)."""
        if not self.active:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def gather(self, obj: Any) -> List[Any]:
        """Every process's ``obj``, in rank order (on every process)."""
        if not self.active:
            return [obj]
        out: List[Any] = [None] * self.world
        tdist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.active:
            tdist.barrier()

    def close(self) -> None:
        if self.active and tdist.is_initialized():
            tdist.destroy_process_group()


def init(device_flag: str = "auto", timeout_s: float = 1800) -> Dist:
    """A ``Dist`` for this process; starts the process group under torchrun."""
    env = settings.distributed_env()
    if env is None:
        return Dist()
    rank, local, world = env
    if world == 1:
        return Dist()
    use_cuda = torch.cuda.is_available() and device_flag in ("auto", "cuda") or device_flag.startswith("cuda")
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        if local >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK {local} but this machine has {torch.cuda.device_count()} GPUs: "
                               "give torchrun --nproc_per_node <= the number of GPUs")
        torch.cuda.set_device(local)
    if not tdist.is_initialized():
        tdist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return Dist(rank, local, world, backend)


def device_for(dist: Dist, device: torch.device) -> torch.device:
    """The device of this process: its local GPU under torchrun with CUDA."""
    if dist.active and device.type == "cuda":
        return torch.device("cuda", dist.local_rank)
    return device


def wrap(model: nn.Module, dist: Dist, device: torch.device, fsdp: bool = False) -> nn.Module:
    """``model`` in DDP, or sharded in place by FSDP2 (``fully_shard`` per block, then the root);
    unchanged for one process without ``fsdp``."""
    if fsdp:
        from torch.distributed.fsdp import fully_shard
        if not dist.active:
            raise RuntimeError("--fsdp shards the model over processes: start the run with torchrun "
                               "(--nproc_per_node >= 2)")
        for block in getattr(model, "blocks", []):
            fully_shard(block)
        fully_shard(model)
        return model
    if not dist.active:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP
    ids = [device.index] if device.type == "cuda" else None
    # buffers are not broadcast: the only ones are the slot usage counters, which each process
    # counts for its own tokens (summed over processes when saved: counted_state)
    return DDP(model, device_ids=ids, broadcast_buffers=False)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP (FSDP2 shards in place: the model itself)."""
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) and \
        type(model).__name__ == "DistributedDataParallel" else model


def no_sync(model: nn.Module, skip: bool):
    """DDP's ``no_sync`` on the inner micro-steps (``skip``); FSDP2 reduces gradients on the last
    micro-step only when told so (``set_requires_gradient_sync``)."""
    if not skip:
        if hasattr(model, "set_requires_gradient_sync"):
            model.set_requires_gradient_sync(True)
        return contextlib.nullcontext()
    if type(model).__name__ == "DistributedDataParallel":
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(False)
    return contextlib.nullcontext()


def full_state(model: nn.Module, optimizer, fsdp: bool) -> Dict[str, Any]:
    """``{"model": ..., "optimizer": ...}``: full (unsharded) state dicts on the CPU. Under FSDP this
    is a collective: every rank calls it; they all get the full state."""
    if not fsdp:
        return {"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    m, o = get_state_dict(model, optimizer, options=opts)
    return {"model": m, "optimizer": o}


def load_full_optimizer_state(model: nn.Module, optimizer, optim_state: Dict[str, Any]) -> None:
    """Load a full optimiser state (a checkpoint's) into the optimiser of an FSDP2-sharded model
    (every rank calls it; each keeps its shards)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(model, optimizer, optim_state_dict=optim_state,
                             options=StateDictOptions(full_state_dict=True))


#: buffers that count what each process saw (the slots' usage); summed over processes on save
COUNTERS = ("usage", "usage_tokens")


def _is_counter(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in COUNTERS


def counted_state(state: Dict[str, Any], dist: Dist) -> Dict[str, Any]:
    """``state`` (a model state dict) with the usage counters summed over the processes (a
    collective: every process calls it), so that a checkpoint counts every process's tokens."""
    if not dist.active:
        return state
    out = dict(state)
    for name in sorted(k for k in state if _is_counter(k)):
        t = state[name].detach().clone()
        dev = t.device
        if dist.backend == "nccl" and dev.type != "cuda":
            t = t.cuda()
        tdist.all_reduce(t)
        out[name] = t.to(dev)
    return out


def keep_counters_on_rank0(model: nn.Module, dist: Dist) -> None:
    """After a resume: the loaded counters hold every process's counts; rank 0 keeps them, the
    others start from zero (so the next save's sum counts each token once)."""
    if dist.active and not dist.is_main:
        with torch.no_grad():
            for name, b in model.named_buffers():
                if _is_counter(name):
                    b.zero_()


def stream_seed(seed: int, stream: int) -> int:
    """The seed of data stream ``stream`` (stream 0 keeps ``seed``: a single-process run draws the
    same batches as before streams existed)."""
    return seed + 1_000_003 * stream
