"""Data-parallel sampling for the policy-gradient loop.

Every rank holds the same probabilities s. At each step rank r draws its own batch and K masks
from the generator seeded by (seed, step, r) (see `loop.step_generator`), computes its K losses,
and all ranks all-gather the masks and losses: each rank then applies the identical update from
the N*K samples (rank-major order: rank 0's K samples first). Only rank 0 (`is_main`) writes
checkpoints, logs and the export and runs the periodic evaluation.

`World` is the single-process default; `TorchWorld` wraps torch.distributed (gloo on CPU, nccl on
CUDA). `init_from_env()` sets up the process group under torchrun (RANK / WORLD_SIZE set).
"""

from __future__ import annotations

import datetime
import os

import torch

from pgprune.errors import PgpruneError


class DistributedError(PgpruneError):
    """A collective failed: another rank died, hung past the timeout, or disagreed on shapes."""


class World:
    """One process: all_gather returns the tensor with a leading world dimension of 1."""

    rank = 0
    size = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """[*shape] -> [size, *shape] (rank order), on t's device."""
        return t.unsqueeze(0)

    def barrier(self) -> None:
        pass


class TorchWorld(World):
    """torch.distributed with an initialised default process group."""

    def __init__(self, device: torch.device | str | None = None):
        import torch.distributed as dist

        if not dist.is_initialized():
            raise DistributedError("torch.distributed is not initialised; launch with torchrun or call init_from_env()")
        self._dist = dist
        self.rank = dist.get_rank()
        self.size = dist.get_world_size()
        # nccl needs CUDA tensors; gloo works on CPU tensors
        self.comm_device = torch.device(device) if device is not None else (
            torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu"))

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        local = t.detach().to(self.comm_device).contiguous()
        out = [torch.empty_like(local) for _ in range(self.size)]
        try:
            self._dist.all_gather(out, local)
        except Exception as exc:  # gloo / nccl raise RuntimeError subclasses with long texts
            raise DistributedError(
                f"rank {self.rank}/{self.size}: all_gather failed ({type(exc).__name__}: {str(exc)[:300]}). "
                "Another rank probably died or is stuck; see its log. The run stopped; restart it with "
                "--resume from the last checkpoint written by rank 0") from exc
        return torch.stack(out).to(t.device)

    def barrier(self) -> None:
        self._dist.barrier()


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_from_env(timeout_s: float = 1800.0) -> tuple[World, torch.device]:
    """Under torchrun: init the process group (nccl with CUDA, else gloo) and return the world and
    this rank's device (cuda:LOCAL_RANK, else cpu). Without torchrun: (World(), None)."""
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return World(), None
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
    if torch.cuda.is_available():
        if local >= torch.cuda.device_count():
            raise DistributedError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} CUDA devices; "
                                   "start at most one process per GPU (torchrun --nproc-per-node)")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return TorchWorld(), device


def shutdown() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
