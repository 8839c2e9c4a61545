"""Training on several processes through torch.distributed, the way torchrun launches them.

`mstore train` reads the usual environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT), so `torchrun --nproc_per_node N -m mstore train ...` and `accelerate launch`
work unchanged; `mstore train --nproc N` starts torchrun itself for one node. Each rank
trains on its own slice of every global batch, gradients are averaged by
DistributedDataParallel (or sharded by FSDP2's `fully_shard`), and only rank 0 commits.
"""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .. import env
from ..errors import InvalidSetting, WorkersFailed


@dataclass
class DistContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    initialised: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def from_environment(device_type: str) -> DistContext:
    """Join the process group torchrun (or accelerate) set up; a no-op for one process."""
    world = env.world_size()
    if world <= 1:
        return DistContext()
    rank = env.rank()
    local_rank = env.local_rank()
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return DistContext(rank, world, local_rank, True)


def device_for(ctx: DistContext, device: str) -> str:
    """Each rank its own GPU: cuda -> cuda:LOCAL_RANK."""
    return f"cuda:{ctx.local_rank}" if device == "cuda" and ctx.active else device


def wrap(model: torch.nn.Module, ctx: DistContext, strategy: str, device: str):
    """The module the training loop calls: DDP around `model`, or `model` sharded in place
    by FSDP2 (each decoder layer / block a unit, then the root), when distributed."""
    if not ctx.active:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [torch.device(device).index] if device.startswith("cuda") else None
        return DistributedDataParallel(model, device_ids=ids)
    from torch.distributed.fsdp import fully_shard

    for module in model.modules():
        if type(module).__name__.endswith(("DecoderLayer", "Block")):
            fully_shard(module)
    fully_shard(model)
    return model


def gather_full_state(model: torch.nn.Module, ctx: DistContext,
                      strategy: str) -> dict[str, torch.Tensor] | None:
    """The unsharded parameters of an FSDP-trained model, on rank 0 (None elsewhere);
    None too when nothing is sharded (single process or DDP: the module is whole)."""
    if not (ctx.active and strategy == "fsdp"):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                 cpu_offload=True))
    return state if ctx.is_main else None


def mean_across(value: float, ctx: DistContext, device: str) -> float:
    if not ctx.active:
        return value
    t = torch.tensor([value], dtype=torch.float64,
                     device=device if device.startswith("cuda") else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item()) / ctx.world


def barrier(ctx: DistContext) -> None:
    if ctx.active:
        dist.barrier()


def shutdown(ctx: DistContext) -> None:
    if ctx.initialised and dist.is_initialized():
        dist.destroy_process_group()


def launch(nproc: int, argv: list[str]) -> int:
    """Re-run this `mstore` command under torchrun with `nproc` processes on this node.

    Every rank fails alike on a bad config, and torchrun then reports the failure with a
    traceback of its own: the workers' stderr is passed through only until the first
    `error:` line, which is the one line the user sees; what follows (the other ranks'
    copies, torchrun's report) is dropped. With --debug everything is shown."""
    if nproc < 1:
        raise InvalidSetting("nproc", ">= 1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", "-m", "mstore", *argv]
    child_env = env.child_environment()
    if env.debug():
        return subprocess.call(cmd, env=child_env)
    proc = subprocess.Popen(cmd, env=child_env, stderr=subprocess.PIPE)
    failed = _relay_until_failure(proc.stderr, sys.stderr.buffer)
    code = _wait(proc)
    if code != 0 and failed is None:
        raise WorkersFailed(code)
    return code


def _relay_until_failure(src, dst) -> bytes | None:
    """Copy lines from `src` to `dst` until the first `error:` line (copied) or the start
    of a traceback or a launcher error log (not copied); then drain `src` silently.
    Returns the error line, if one came. Ctrl-C reaches the workers too: keep reading
    while they stop."""
    error, quiet = None, False
    while True:
        try:
            line = src.readline()
        except KeyboardInterrupt:
            continue
        if not line:
            return error
        if quiet:
            continue
        if line.startswith(b"error: "):
            error, quiet = line, True
        elif line.startswith(b"Traceback ") or _LAUNCHER_ERROR.match(line):
            quiet = True
            continue
        dst.write(line)
        dst.flush()


def _wait(proc: subprocess.Popen) -> int:
    while True:
        try:
            return proc.wait()
        except KeyboardInterrupt:
            continue


# torch's error log lines (`E1201 19:42:07.123 ...`), which start torchrun's failure report
_LAUNCHER_ERROR = re.compile(rb"\[?E\d{4} \d\d:\d\d:\d\d")
