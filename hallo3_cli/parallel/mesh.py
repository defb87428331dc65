"""Process groups for one video on many processes, from torchrun's environment (no launcher of our own)."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from hallo3_cli.errors import Hallo3Error
from hallo3_cli.parallel.degrees import Degrees, ParallelUsageError, choose_degrees

#: Mesh dimension names, outermost first. Sequence rank = ring rank × ulysses degree + ulysses rank.
MESH_DIMS = ("cfg", "ring", "ulysses")


def torchrun_env() -> tuple[int, int, int] | None:
    """``(rank, world_size, local_rank)`` when started by torchrun, else None."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    try:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    except ValueError as err:
        raise Hallo3Error(f"bad torchrun environment (RANK/WORLD_SIZE/LOCAL_RANK): {err}") from None


@dataclass(frozen=True)
class ParallelConfig:
    """The degrees and the device mesh of a parallel denoiser, with this process's place in it."""

    degrees: Degrees
    mesh: DeviceMesh | None  # None: one process, nothing to split
    device: torch.device

    @property
    def enabled(self) -> bool:
        return self.mesh is not None and self.degrees.world > 1

    def group(self, dim: str) -> dist.ProcessGroup:
        return self.mesh.get_group(dim)

    def local_rank(self, dim: str) -> int:
        return self.mesh.get_local_rank(dim) if self.mesh is not None else 0

    @property
    def cfg_rank(self) -> int:
        return self.local_rank("cfg")

    @property
    def sequence_rank(self) -> int:
        return self.local_rank("ring") * self.degrees.ulysses + self.local_rank("ulysses")

    @property
    def is_main(self) -> bool:
        """The one process that writes outputs (global rank 0)."""
        return not dist.is_initialized() or dist.get_rank() == 0


def init_parallel(degrees: Degrees, device: str | torch.device | None = None, *,
                  timeout: float | None = None) -> ParallelConfig:
    """Join torchrun's process group (gloo on CPU, nccl on CUDA with device ``cuda:LOCAL_RANK``) and build
    the ``cfg × ring × ulysses`` device mesh. Without torchrun, ``degrees`` must be all 1. ``timeout``:
    seconds any collective may wait before it fails (None: the backend's default)."""
    env = torchrun_env()
    if env is None:
        if degrees.world != 1:
            raise ParallelUsageError(
                f"{degrees} needs {degrees.world} processes; launch with "
                f"`torchrun --nproc-per-node {degrees.world} --no-python hallo3 ...`"
            )
        return ParallelConfig(degrees, None, torch.device(device or "cpu"))
    rank, world, local_rank = env
    if world != degrees.world:
        raise ParallelUsageError(f"{degrees} needs {degrees.world} processes, torchrun started {world}")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        extra = {} if timeout is None else {"timeout": datetime.timedelta(seconds=timeout)}
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None, **extra)
    shape = (degrees.cfg, degrees.ring, degrees.ulysses)
    mesh = init_device_mesh(device.type, shape, mesh_dim_names=MESH_DIMS)
    return ParallelConfig(degrees, mesh, device)


def setup_parallel(
    heads: int,
    *,
    cfg_parallel: bool | None = None,
    ulysses: int | None = None,
    ring: int | None = None,
    device: str | torch.device | None = None,
    timeout: float | None = None,
) -> ParallelConfig:
    """``--parallel video``: the degrees for torchrun's world size (checked before anything loads), then
    the process group and mesh. Outside torchrun it says how to launch; under ``torchrun`` with one
    process it is a plain single-process run."""
    env = torchrun_env()
    if env is None:
        raise ParallelUsageError(
            "--parallel video splits one video over the processes that torchrun starts: "
            "`torchrun --nproc-per-node N --no-python hallo3 render ... --parallel video`"
        )
    degrees = choose_degrees(env[1], heads, cfg_parallel=cfg_parallel, ulysses=ulysses, ring=ring)
    return init_parallel(degrees, device, timeout=timeout)
