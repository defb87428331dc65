"""One render on the processes torchrun started: the render's options, its process group, the few
collectives the jobs layer needs (barrier, agreeing on a number), and who reports a failure.

The jobs use it like this::

    session = start_video(VideoParallel(ulysses=2), preset, runtime)  # before any load; exit 2 on a bad split
    loader = PipelineLoader(preset, session.runtime, parallel=session.config)
    with session.guard():          # a failure anywhere stops every rank, one message
        ...                        # rank 0 (session.is_main) writes, the others only compute
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass

from hallo3_cli.errors import Hallo3Error
from hallo3_cli.parallel.degrees import ParallelUsageError
from hallo3_cli.parallel.mesh import ParallelConfig, setup_parallel, torchrun_env

@dataclass(frozen=True)
class VideoParallel:
    """``--parallel video`` and its degree overrides (None: chosen from the process count and heads)."""

    cfg_parallel: bool | None = None
    ulysses: int | None = None
    ring: int | None = None


def transformer_heads(preset) -> int:
    """Attention heads of a preset's main DiT (known without loading it)."""
    from hallo3_cli.networks import transformer_arguments

    return int(transformer_arguments(preset)["num_attention_heads"])


# -- who reports a failure ----------------------------------------------------------------------

_PEER_MARKERS = ("connection closed by peer", "connection reset by peer", "remote worker", "broken pipe",
                 "communicator was aborted", "nccl error")
_active = {"stage": "none"}  # where this process's --parallel video render is (see announce)


class PeerStopped(Hallo3Error):
    """This rank stops because another one failed (that one reports why)."""


def is_peer_failure(err: BaseException) -> bool:
    """A collective that failed because another rank is gone (its own message is the one that counts)."""
    import torch.distributed as dist

    if isinstance(err, PeerStopped):
        return True
    if isinstance(err, getattr(dist, "DistError", ())) and not isinstance(err, getattr(dist, "DistStoreError", ())):
        return True
    return isinstance(err, RuntimeError) and any(m in str(err).lower() for m in _PEER_MARKERS)


def reports_failure(err: BaseException) -> bool:
    """Whether this process prints ``err`` (the CLI asks before printing its one line).

    In a ``--parallel video`` render only one message appears: failures that every rank meets alike
    (bad options and inputs, checked before the render starts) are reported by rank 0; a failure of
    one rank during the render by that rank; the others, which only see its consequences (a
    collective whose peer is gone, torchrun's SIGTERM), stay quiet. Ctrl-C reaches every rank:
    rank 0 says it."""
    env = torchrun_env()
    if env is None or env[1] == 1:
        return True
    rank = env[0]
    stage = _active["stage"]
    if stage == "none":  # not a parallel-video render (or not yet known to be one): as before
        return True
    if isinstance(err, KeyboardInterrupt) or stage == "preflight":
        return rank == 0
    if isinstance(err, SystemExit) or is_peer_failure(err):  # SystemExit: torchrun's SIGTERM (cli._terminated)
        return False
    return True


def announce(stage: str) -> None:
    """Mark this process's parallel render as being in ``stage`` (``preflight``, then ``render``); it stays
    so until the process ends, for the CLI's report."""
    _active["stage"] = stage


def prints_results() -> bool:
    """Whether this process prints the command's result (in a ``--parallel video`` render only rank 0)."""
    env = torchrun_env()
    return _active["stage"] == "none" or env is None or env[0] == 0


# -- the session --------------------------------------------------------------------------------


@dataclass
class VideoSession:
    """The process group of one ``--parallel video`` render and the runtime on this rank's device."""

    config: ParallelConfig
    runtime: object  # hallo3_cli.runtime.Runtime, on config.device

    @property
    def is_main(self) -> bool:
        return self.config.is_main

    @property
    def world(self) -> int:
        return self.config.degrees.world

    def barrier(self) -> None:
        """Every rank waits here (e.g. for rank 0's stage files); no-op on one process."""
        import torch.distributed as dist

        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()

    def agree(self, value: int) -> int:
        """Rank 0's ``value`` on every rank (e.g. the number of finished clips of a resume)."""
        import torch
        import torch.distributed as dist

        if not (dist.is_initialized() and dist.get_world_size() > 1):
            return value
        device = self.config.device if self.config.device.type == "cuda" else "cpu"
        tensor = torch.tensor([value], dtype=torch.int64, device=device)
        dist.broadcast(tensor, src=0)
        return int(tensor.item())

    @contextlib.contextmanager
    def guard(self):
        """The render itself: failures after this point are this rank's own (see :func:`reports_failure`).
        On success every rank waits for the others (rank 0 finishes writing)."""
        announce("render")
        yield self
        self.barrier()

    def close(self) -> None:
        """Leave the process group (after the last render of this process)."""
        import torch.distributed as dist

        if dist.is_initialized():
            if dist.get_world_size() > 1:
                dist.barrier()  # nobody tears its gloo threads down while a peer still talks to it
            dist.destroy_process_group()


def start_video(options: VideoParallel, preset, runtime) -> VideoSession:
    """``--parallel video``: check the options and the split (usage errors, exit 2, before anything loads),
    then join torchrun's process group on this rank's device (``cuda:LOCAL_RANK`` on CUDA)."""
    from hallo3_cli.runtime import resolve_device

    announce("preflight")
    if getattr(runtime, "cache", None) is not None:
        raise ParallelUsageError("--cache (First Block Cache) does not work with --parallel video yet: "
                                 "ranks would decide on their own whether to skip blocks")
    if torchrun_env() is None:
        setup_parallel(1)  # raises: how to launch
    device = resolve_device(runtime.device)
    config = setup_parallel(transformer_heads(preset), cfg_parallel=options.cfg_parallel, ulysses=options.ulysses,
                            ring=options.ring, device=device, timeout=collective_timeout())
    runtime = dataclasses.replace(runtime, device=str(config.device))
    from hallo3_cli.loading import resolve_runtime

    return VideoSession(config, resolve_runtime(runtime, preset))


def collective_timeout() -> float:
    """Seconds any collective may wait (``HALLO3_COLLECTIVE_TIMEOUT``, default 30 min): long enough for
    rank 0 to compute the stage files while the others wait, short enough that no rank waits forever."""
    raw = os.environ.get("HALLO3_COLLECTIVE_TIMEOUT", "1800")
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise Hallo3Error(f"HALLO3_COLLECTIVE_TIMEOUT must be a positive number of seconds, got {raw!r}")
    return seconds
