"""``render --batch``: a jobs file of ``prompt@@image@@audio`` lines (the official input format), shared by rank
under ``torchrun`` (``--parallel jobs``) or rendered one after the other on all ranks (``--parallel video``)."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

from hallo3_cli import fsutil
from hallo3_cli.errors import Hallo3Error, InputError
from hallo3_cli.jobs.video import Job, VideoRenderer

log = logging.getLogger("hallo3")


def read_jobs(jobs_file: str | Path, out_dir: str | Path, seed: int) -> list[Job | Hallo3Error]:
    """Parse ``prompt@@image@@audio`` lines (the official input format). Relative paths resolve against
    the jobs file's folder. A malformed line becomes an error entry (reported, the others still run).

    The file must be UTF-8 (a byte-order mark is allowed). Outputs are named
    ``<image stem>-<audio stem>-seed_<seed>-<digest>.mp4``, the digest (8 hex) being that of the job's
    three fields: different jobs never share an output; a line repeating an earlier job is reported
    as an error entry instead of being rendered (or listed) twice.
    """
    jobs_file = fsutil.require_file(jobs_file)
    base = jobs_file.parent
    out_dir = Path(out_dir)
    raw = jobs_file.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise InputError(f"line {line}: not UTF-8 text (byte 0x{raw[err.start]:02x}); save the jobs file as UTF-8", jobs_file) from None
    jobs: list[Job | Hallo3Error] = []
    first_line: dict[Path, int] = {}
    # Lines end at "\n" (and "\r\n") only: str.splitlines would also break at U+2028, U+0085, form feeds and
    # other separators, which are ordinary characters of a prompt here (a phantom job from half a line).
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = line.split("@@")
        if len(fields) != 3:
            jobs.append(InputError(f"line {number}: expected 'prompt@@image@@audio'", jobs_file))
            continue
        prompt, image, speech = (field.strip() for field in fields)
        image_path, speech_path = base / image, base / speech
        digest = hashlib.sha256("@@".join((prompt, image, speech)).encode("utf-8", "surrogateescape")).hexdigest()[:8]
        name = f"{image_path.stem[:80]}-{speech_path.stem[:80]}-seed_{seed}-{digest}.mp4"
        output = out_dir / name
        if output in first_line:
            jobs.append(InputError(f"line {number}: the same job as line {first_line[output]} (both would write {name}); skipped", jobs_file))
            continue
        first_line[output] = number
        jobs.append(Job(image_path, speech_path, output, prompt or None))
    for problem in (job for job in jobs if isinstance(job, Hallo3Error)):
        log.warning("%s", problem)  # pre-flight: said before any rendering (and again in the final summary)
    return jobs


def shard(items: list, rank: int, world_size: int) -> list:
    """This process's share of ``items`` (round-robin by rank)."""
    return items[rank::world_size]


def render_batch(jobs_file: str | Path, out_dir: str | Path, *, model: str = "hallo3", seed: int = 42,
                 shard_jobs: bool = True, **options) -> tuple[list[Path], list[str]]:
    """Render every job of a jobs file (skipping finished outputs). Under ``torchrun`` the jobs are
    shared by rank (``RANK``/``WORLD_SIZE``; ``--parallel jobs``) unless ``shard_jobs`` is False
    (``--parallel none``) or ``parallel`` is given (``--parallel video``: every job on all processes,
    one after the other; only rank 0 writes and reports). Returns (written outputs, error messages)."""
    video = options.get("parallel") is not None
    if video:
        from hallo3_cli.jobs.parallel_session import announce

        announce("preflight")
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    jobs_file, out_dir = fsutil.path_argument(jobs_file, "jobs_file"), fsutil.path_argument(out_dir, "out_dir")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    jobs = read_jobs(jobs_file, out_dir, seed)  # a bad jobs file fails before out_dir exists
    fsutil.check_output_folder(out_dir, inputs=[jobs_file])
    fsutil.check_output_folder(options.get("cache_dir") or Path(out_dir) / ".hallo3-cache", inputs=[jobs_file])
    if shard_jobs and not video:
        jobs = shard(jobs, rank, world)
    out_dir = fsutil.ensure_output_folder(out_dir)
    written, errors = [], []
    renderer = None
    for job in jobs:
        if isinstance(job, Hallo3Error):
            errors.append(str(job))
            continue
        if os.path.lexists(job.output):
            try:  # only a regular file is a finished video; a folder, fifo or device by that name is refused
                fsutil.check_output_path(job.output, fsutil.VIDEO_SUFFIXES)
            except Hallo3Error as err:
                errors.append(str(err))
                log.error("%s", err)
                continue
            if job.output.is_file():
                log.info("%s exists, skipping", job.output)
                written.append(job.output)
                continue
        renderer = renderer or VideoRenderer(model, seed=seed, **options)  # missing weights stop the batch
        try:
            written.append(renderer.render(job))
        except Hallo3Error as err:
            if video and not getattr(err, "agreed", False):
                raise  # the ranks no longer agree on where they are: stop them all
            errors.append(str(err))
            if renderer.is_main:
                log.error("%s", err)
    if video:
        if renderer is not None:
            renderer.close()
        return (written, errors) if rank == 0 else ([], [])
    if world > 1 and shard_jobs:
        _wait_for_other_ranks()
    return written, errors


def _wait_for_other_ranks() -> None:
    """Under torchrun a rank that exits non-zero gets its siblings killed: wait until all are done."""
    import datetime

    import torch.distributed as dist

    if not os.environ.get("MASTER_ADDR"):
        return
    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=datetime.timedelta(days=30))
    dist.barrier()
    dist.destroy_process_group()
