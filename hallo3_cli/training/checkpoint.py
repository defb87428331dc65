"""A training run's folder on disk: its record (``run.json``), checkpoints written atomically and kept up to a
limit, and the exported results (docs/training.md "The trainer").

``RUN/checkpoints/step-N/`` holds everything a resume needs, and nothing pickled:

=========================  ==========================================================================================
``trainable.safetensors``  the trained parameters (float32 masters; LoRA: the adapters), by trainer name
``ema.safetensors``        their exponential moving average (float32)
``optimizer.pt``           the optimizer's full state dict keyed by parameter name (torch.distributed.checkpoint's
                           full format, gathered from every process; tensors and numbers only: read with
                           ``weights_only=True``)
``state.json``             update counters, the LR scheduler's state, the data position and the run's identity
=========================  ==========================================================================================

The files are the same whatever the engine (one process, DDP, FSDP2): full tensors, written by the main process.

Every random draw of the trainer depends only on (seed, update step, micro-batch slot), so the data position is the
update step and no RNG state needs saving.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from pathlib import Path

import torch

from hallo3_cli.errors import InputError, UsageError, reason

RUN_FILE = "run.json"
RUN_FORMAT = "hallo3.train-run"
CHECKPOINTS = "checkpoints"
CHECKPOINT_FORMAT = "hallo3.train-checkpoint"
FORMAT_VERSION = 2  # 2: the optimizer's state keyed by parameter name
TRAINABLE = "trainable.safetensors"
EMA = "ema.safetensors"
OPTIMIZER = "optimizer.pt"
STATE = "state.json"
_STEP = re.compile(r"step-(\d+)")


@contextlib.contextmanager
def atomic_folder(path: Path):
    """Yield a fresh temporary folder beside ``path``; when the block succeeds it replaces ``path`` (any older folder
    there is removed after the rename), else it is removed. A reader never sees a half-written folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    old = path.parent / f".{path.name}.old-{os.getpid()}"
    for leftover in (tmp, old):
        shutil.rmtree(leftover, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        for file in tmp.rglob("*"):
            if file.is_file() and not file.is_symlink():
                with open(file, "rb") as f:
                    os.fsync(f.fileno())
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not path.exists():
            os.replace(old, path)
        raise


def read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"unreadable {what} ({reason(err)})", path) from None
    if not isinstance(data, dict):
        raise InputError(f"not a {what}", path)
    return data


def write_json(path: Path, data: dict) -> None:
    from hallo3_cli.fsutil import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# -- the run's record -------------------------------------------------------------------------------------------------

def claim_run(run: Path, identity: dict, *, resume: bool) -> None:
    """Make sure ``run`` may hold this run: a new or empty folder, or (``resume``) one holding the same run.
    UsageError (exit 2) for a folder that holds another run, or this one without ``resume``."""
    record = run / RUN_FILE
    if record.is_file():
        held = read_json(record, "training run record")
        if held.get("format") != RUN_FORMAT:
            raise UsageError(f"{record} is not a hallo3 training run record")
        if not resume:
            raise UsageError(f"-o {run} already holds a training run; add --resume to continue it, or choose "
                             "another folder")
        old = held.get("identity", {})
        changed = sorted(k for k in set(old) | set(identity) if old.get(k) != identity.get(k))
        if changed:
            what = ", ".join(f"{k} {old.get(k)!r} → {identity.get(k)!r}" for k in changed[:3])
            raise UsageError(f"-o {run} holds a different run ({what}); --resume continues the same run only")
    elif run.exists() and (not run.is_dir() or any(run.iterdir())):
        raise UsageError(f"-o {run} exists and is not a training run folder (an empty or new folder is needed)")


def write_run(run: Path, identity: dict, config: dict) -> None:
    run.mkdir(parents=True, exist_ok=True)
    write_json(run / RUN_FILE, {"format": RUN_FORMAT, "format_version": FORMAT_VERSION, "identity": identity,
                                "config": config})


# -- checkpoints ------------------------------------------------------------------------------------------------------

def checkpoint_dir(run: Path, step: int) -> Path:
    return run / CHECKPOINTS / f"step-{step}"


def checkpoints(run: Path) -> list[tuple[int, Path]]:
    """The complete checkpoints of a run, oldest first (temporary folders of an interrupted save are not listed)."""
    folder = run / CHECKPOINTS
    found = []
    if folder.is_dir():
        for entry in folder.iterdir():
            match = _STEP.fullmatch(entry.name)
            if match and (entry / STATE).is_file():
                found.append((int(match.group(1)), entry))
    return sorted(found)


def save_checkpoint(run: Path, step: int, *, trainable: dict[str, torch.Tensor], ema: dict[str, torch.Tensor],
                    optimizer_state: dict, state: dict, keep: int | None) -> Path:
    """Write ``RUN/checkpoints/step-N/`` atomically, then remove the oldest beyond ``keep`` (None: keep all)."""
    from safetensors.torch import save_file

    path = checkpoint_dir(run, step)
    with atomic_folder(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in trainable.items()}, str(tmp / TRAINABLE))
        save_file({k: v.detach().cpu().contiguous() for k, v in ema.items()}, str(tmp / EMA))
        torch.save(optimizer_state, tmp / OPTIMIZER)
        (tmp / STATE).write_text(json.dumps({"format": CHECKPOINT_FORMAT, "format_version": FORMAT_VERSION,
                                             "step": step, **state}, indent=2, sort_keys=True) + "\n")
    if keep is not None:
        for _, old in checkpoints(run)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return path


def load_checkpoint(path: Path) -> dict:
    """A checkpoint folder's contents: ``trainable``, ``ema``, ``optimizer`` and ``state``. InputError (exit 3)
    naming the file when something is unreadable."""
    from safetensors.torch import load_file

    state = read_json(path / STATE, "checkpoint state")
    if state.get("format") != CHECKPOINT_FORMAT or state.get("format_version") != FORMAT_VERSION:
        raise InputError(f"not a {CHECKPOINT_FORMAT} version {FORMAT_VERSION} file", path / STATE)
    loaded = {"state": state}
    for key, name in (("trainable", TRAINABLE), ("ema", EMA)):
        try:
            loaded[key] = load_file(str(path / name))
        except Exception as err:  # safetensors raises its own types for every kind of damage
            raise InputError(f"unreadable checkpoint file ({reason(err)})", path / name) from None
    try:
        loaded["optimizer"] = torch.load(path / OPTIMIZER, map_location="cpu", weights_only=True)
    except Exception as err:
        raise InputError(f"unreadable optimizer state ({reason(err)})", path / OPTIMIZER) from None
    return loaded
