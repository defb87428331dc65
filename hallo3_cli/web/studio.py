"""The page's work, without Gradio (testable): the server's private folder, the rule for which files a client may
name, the sessions, the models kept loaded between jobs, the one-GPU lock, and the render worker whose events the
page shows."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import queue
import re
import shutil
import stat
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from hallo3_cli import geometry, options
from hallo3_cli.errors import Hallo3Error, InputError, UsageError, reason
from hallo3_cli.runtime import OFFLOAD_CHOICES

log = logging.getLogger("hallo3")

DEFAULT_MAX_SPEECH_SECONDS = 600.0
#: Seconds between two progress updates sent to the page (tiny models step far faster than a browser repaints).
UPDATE_INTERVAL = 0.25
#: The one answer to a file the page did not receive as an upload: the same words whether the path exists or not.
NOT_UPLOADED = "not a file uploaded to this page: upload the file itself (the server opens no path it is sent)"
#: The server's private folders are ``<temp>/hallo3-serve-*``; each holds this file, locked while its server runs.
SERVER_PREFIX = "hallo3-serve-"
OWNER_LOCK = "owner.lock"


# -- the server's private folder ----------------------------------------------------------------
def remove_orphans(parent: str | os.PathLike | None = None) -> list[Path]:
    """Delete the private folders (``<parent>/hallo3-serve-*``, this user's) whose server is gone, and return them.
    A running server holds an exclusive lock on the folder's ``owner.lock``; the kernel drops it when the process
    ends however it ends (``kill -9`` included), so a lock we can take means nobody owns the folder any more.
    Folders without a lock file, links and other users' folders are left alone (hence not
    :func:`hallo3_cli.fsutil.exclusive_lock`, which creates the file it locks)."""
    import fcntl

    parent = Path(parent if parent is not None else tempfile.gettempdir())
    removed = []
    for folder in sorted(parent.glob(SERVER_PREFIX + "*")):
        try:
            info = folder.lstat()
            if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
                continue
            fd = os.open(folder / OWNER_LOCK, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)  # its server is running
            continue
        try:
            shutil.rmtree(folder, ignore_errors=True)
        finally:
            os.close(fd)
        if not folder.exists():
            removed.append(folder)
    return removed


def claim_server_dir(parent: str | os.PathLike | None = None) -> tuple[Path, int]:
    """A new private folder (mode 700) for this server, and the descriptor of its lock (held until the process
    ends; close it only after deleting the folder). Created under a hidden name, locked, then renamed into
    place, so that :func:`remove_orphans` in another server never sees it unlocked."""
    import fcntl

    parent = Path(parent if parent is not None else tempfile.gettempdir())
    staging = Path(tempfile.mkdtemp(prefix="." + SERVER_PREFIX, dir=parent))
    fd = os.open(staging / OWNER_LOCK, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        root = staging.with_name(staging.name[1:])
        staging.rename(root)  # mkdtemp's random name: the visible name is as unique as the hidden one
    except BaseException:
        os.close(fd)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return root, fd


def one_line(err: BaseException, names: dict[str, str]) -> str:
    """The CLI's one-line message, with the server's upload paths replaced by the uploaded files' names."""
    if isinstance(err, Hallo3Error):
        message = str(err)
    else:  # as the CLI's main() reports an unexpected error
        message = f"{type(err).__name__}: {reason(err)}"
    for path, name in sorted(names.items(), key=lambda item: -len(item[0])):
        message = message.replace(path, name)
    return message


def safe_stem(path: str | os.PathLike, fallback: str) -> str:
    """A file-name-safe short stem of an uploaded file's name."""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", Path(path).stem).strip("_")[:40]
    return stem or fallback


def check_speech(path: str | os.PathLike, max_seconds: float) -> float:
    """The recording's duration; a one-line error for an unreadable or too long one."""
    from hallo3_cli.audio_io import audio_info

    duration = audio_info(path).duration
    if duration > max_seconds:
        raise InputError(f"is {duration:.1f} s long; this server accepts at most {max_seconds:g} s of speech "
                         "(hallo3 serve --max-speech-seconds)", path)
    return duration


def memory_verdict(preset, memory: str, vae_tiling: bool) -> str:
    """What ``plan`` predicts for this memory mode on this machine's device, in one line."""
    from hallo3_cli.doctor import cpu_device
    from hallo3_cli.formatting import memory_size
    from hallo3_cli.plan import DEVICE_RESERVE, choose_memory_mode, free_device_memory, plan
    from hallo3_cli.runtime import Runtime, resolve_device

    device = resolve_device("auto")
    try:
        if device.startswith("cuda"):
            free = free_device_memory(device)
            offload, tiling = memory, vae_tiling
            prefix = ""
            if memory == "auto":
                chosen = choose_memory_mode(Runtime(offload="auto", vae_tiling=vae_tiling), preset, free)
                offload, tiling = chosen.offload, chosen.vae_tiling
                prefix = f"auto → {offload}{' + VAE tiling' if tiling else ''}: "
            need = plan(preset, offload=offload, vae_tiling=tiling, device_kind="cuda").peak_device_bytes
            if free is None:
                return f"{prefix}{device}: planned peak {memory_size(need)}; free memory unknown"
            fits = "fits" if need + DEVICE_RESERVE <= free else "does NOT fit"
            return f"{prefix}{device}: planned peak {memory_size(need)} of {memory_size(free)} free — {fits}"
        planned = plan(preset, offload="none", vae_tiling=vae_tiling, device_kind="cpu")
        free = cpu_device()["free"]
        available = f" of {memory_size(free)} available" if free else ""
        return (f"{device}: memory is shared with the host, offloading moves nothing; planned peak "
                f"{memory_size(planned.peak_host_bytes)} of RAM{available}")
    except Hallo3Error as err:
        return f"plan unavailable: {err}"


def framing_preview(pipe, image: str | os.PathLike):
    """What the model will see, before any GPU work: (the model frame with the face box in green, the area
    outside the face mask dimmed and the video's crop in yellow; the first video frame's crop; a caption)."""
    from PIL import ImageDraw

    from hallo3_cli.image_io import crop_box_for_output, preview_image

    portrait = pipe.frame_portrait(image)
    picture = preview_image(portrait.image, portrait.mask, portrait.face_box.tolist())
    crop = crop_box_for_output(portrait.framing, pipe.height, pipe.width)
    video = ((portrait.image.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    video = video[crop[1]:crop[3], crop[0]:crop[2]]
    ImageDraw.Draw(picture).rectangle([crop[0], crop[1], crop[2] - 1, crop[3] - 1], outline=(255, 220, 0), width=1)
    from PIL import Image

    how = ("square portrait: padded to the frame, the video is the centre square" if portrait.framing == "pad"
           else "resized to cover the frame and centre-cropped")
    face = ("face found" if portrait.face.found
            else "**no face detected**: the whole image is the face region (zero face embedding)")
    caption = (f"{portrait.source_width}×{portrait.source_height} → {pipe.width}×{pipe.height} frame ({how}); "
               f"video {crop[2] - crop[0]}×{crop[3] - crop[1]}; {face}, box {portrait.face_box.tolist()}")
    return _enlarged(picture), _enlarged(Image.fromarray(video)), caption


def _enlarged(picture, short_side: int = 240):
    """Tiny test frames scaled up for the page (nearest neighbour: every pixel stays visible as it is)."""
    from PIL import Image

    factor = math.ceil(short_side / min(picture.size))
    return picture if factor <= 1 else picture.resize((picture.width * factor, picture.height * factor), Image.NEAREST)


class Cancelled(Exception):
    """Raised from the step hook when the session's Cancel was pressed."""


@dataclass
class Session:
    """One browser tab (Gradio session): its private folder, the cancel flags of its running jobs and its
    finished renders."""

    folder: Path
    jobs: set = field(default_factory=set)  # a threading.Event per running job: set = cancel it
    uploads: set = field(default_factory=set)  # Gradio's copies of this session's uploads
    renders: dict[str, Path] = field(default_factory=dict)  # label → mp4 in ``folder``
    ended: bool = False  # the tab closed: a worker still finishing removes what it wrote

    def cancel(self) -> None:
        for flag in list(self.jobs):
            flag.set()


class Studio:
    """The server's state: the models (kept loaded between jobs), the sessions, the one-GPU lock."""

    #: Gradio's upload folder (``GRADIO_TEMP_DIR``) in the server's folder: its ``<hash>/<name>`` files are the only
    #: ones a client may name
    UPLOADS = "uploads"

    def __init__(self, model: str, *, cache_dir: str | os.PathLike, root: str | os.PathLike,
                 max_speech_seconds: float = DEFAULT_MAX_SPEECH_SECONDS):
        from hallo3_cli import stages
        from hallo3_cli.jobs import require_weights
        from hallo3_cli.presets import get_preset

        self.preset = get_preset(model)
        # every weight a render needs, checked (or fetched) before the page starts, not at its first render
        require_weights(self.preset, (stages.AUDIO, stages.REFERENCE, stages.CLIPS), allow_download=True)
        self.cache_dir = Path(cache_dir)
        self.root = Path(root)
        self.uploads = self.root / self.UPLOADS
        self.max_speech_seconds = float(max_speech_seconds)
        self.gpu = threading.Lock()  # Gradio's queue runs one render at a time; this makes it a fact
        self._sessions: dict[str, Session] = {}
        self._sessions_lock = threading.Lock()
        self._renderer = None  # (memory, vae_tiling, VideoRenderer): models stay loaded between jobs
        self._framer = None
        self._framer_lock = threading.Lock()

    # -- what a client may name --------------------------------------------------------------
    def uploaded(self, path) -> str:
        """``path`` if it is a file this server stored as an upload (or a copy of an output it sent to the page),
        else :class:`InputError` with :data:`NOT_UPLOADED`. Gradio keeps each upload (and each output it serves)
        as ``<upload folder>/<hash>/<name>``, the hash seeded with a secret of this installation: a client can
        only name such a file if the server gave it that path, in answer to its upload or as its output. Nothing
        is opened to decide: a missing file, a folder, a link out of the upload folder, a URL, a relative or
        malformed path all get the same message."""
        try:
            if not isinstance(path, str) or not path:
                raise ValueError(path)
            real = Path(os.path.realpath(path))  # every link resolved: where the bytes really are
            inside = real.parent.parent == Path(os.path.realpath(self.uploads))
            if not (os.path.isabs(path) and inside and stat.S_ISREG(real.lstat().st_mode)):
                raise ValueError(path)
        except (OSError, ValueError, TypeError):
            raise InputError(NOT_UPLOADED) from None
        return str(real)

    # -- sessions -----------------------------------------------------------------------------
    def session(self, session_id: str | None) -> Session:
        key = re.sub(r"[^A-Za-z0-9_-]", "", session_id or "") or "anonymous"
        with self._sessions_lock:
            if key not in self._sessions:
                folder = self.root / "sessions" / key
                folder.mkdir(parents=True, exist_ok=True)
                self._sessions[key] = Session(folder)
            return self._sessions[key]

    def end_session(self, session_id: str | None) -> None:
        """The tab closed: stop its render, delete its folder and the uploads no other session holds."""
        key = re.sub(r"[^A-Za-z0-9_-]", "", session_id or "") or "anonymous"
        with self._sessions_lock:
            session = self._sessions.pop(key, None)
            held = set().union(*(other.uploads for other in self._sessions.values()))
        if session is None:
            return
        session.ended = True
        session.cancel()
        shutil.rmtree(session.folder, ignore_errors=True)
        uploads = self.uploads.resolve()
        for name in session.uploads - held:  # Gradio keys uploads by content: another tab may hold the same file
            path = Path(name).resolve()
            if path.is_relative_to(uploads) and path.is_file():
                path.unlink(missing_ok=True)
                with contextlib.suppress(OSError):
                    path.parent.rmdir()

    # -- models -------------------------------------------------------------------------------
    def renderer(self, memory: str, vae_tiling: bool):
        """The VideoRenderer for this memory setting, kept for the next job. Another setting replaces it (two
        copies of the release's models would not fit next to each other)."""
        from hallo3_cli.jobs import VideoRenderer
        from hallo3_cli.runtime import Runtime

        if memory not in OFFLOAD_CHOICES:
            raise UsageError(f"memory mode must be one of {', '.join(OFFLOAD_CHOICES)}, got {memory!r}")
        if self._renderer is not None and self._renderer[:2] == (memory, bool(vae_tiling)):
            return self._renderer[2]
        self._renderer = None
        renderer = VideoRenderer(self.preset.name, cache_dir=self.cache_dir, progress=False,
                                 runtime=Runtime(offload=memory, vae_tiling=bool(vae_tiling)))
        self._renderer = (memory, bool(vae_tiling), renderer)
        return renderer

    def framer(self):
        """A CPU pipeline for framing previews (only its face models ever load)."""
        from hallo3_cli.loading import PipelineLoader
        from hallo3_cli.runtime import Runtime

        if self._framer is None:
            self._framer = PipelineLoader(self.preset, Runtime(device="cpu")).need("face_analyzer")
        return self._framer

    def preview(self, face: str | None):
        if face is None:
            return None, None, ""
        with self._framer_lock:
            return framing_preview(self.framer(), face)

    # -- rendering ----------------------------------------------------------------------------
    def settings(self, seed, steps, cfg):
        from hallo3_cli.jobs import RenderSettings

        try:
            seed, steps = int(seed), int(steps)
        except (TypeError, ValueError, OverflowError):
            raise UsageError(f"seed and steps must be whole numbers, got {seed!r}, {steps!r}") from None
        try:
            options.check_steps(steps, "steps")
            cfg = options.check_guidance(cfg, "CFG scale")
        except ValueError as err:
            raise UsageError(str(err)) from None
        return RenderSettings.for_preset(self.preset, seed, steps, cfg)

    def render_events(self, session: Session, face: str, speech: str, prompt: str | None, settings, memory: str,
                      vae_tiling: bool, events: "queue.Queue", cancel: threading.Event):
        """The render itself (runs in a worker thread): puts ``(kind, ...)`` events for the page."""
        from hallo3_cli.image_io import crop_box_for_output
        from hallo3_cli.jobs import Job, render_key
        from hallo3_cli.video_io import VideoWriter

        def check():
            if cancel.is_set():
                raise Cancelled

        preset = self.preset
        with self.gpu:
            check()  # cancelled (or its client gone) while it waited for the GPU
            events.put(("status", "loading the models"))
            renderer = self.renderer(memory, vae_tiling)
            renderer.settings = settings  # one job at a time (self.gpu): the kept renderer takes this job's settings
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            check()
            events.put(("status", "embedding the speech"))
            audio = renderer.audio_stage(Path(speech), self.cache_dir)
            num_frames = audio.meta["num_frames"]
            events.put(("total", geometry.num_clips(num_frames, preset.clip_length, preset.motion_frames)))
            check()
            events.put(("status", "encoding the portrait"))
            reference = renderer.reference_stage(Path(face), prompt, self.cache_dir)
            check()
            crop = crop_box_for_output(reference.meta["framing"], preset.height, preset.width)
            # The render key (inputs' content, prompt, seed, settings, weights, runtime) ends the name: two
            # portraits uploaded under one file name never share a name, the same render always has its own.
            key = render_key(audio, reference, settings, preset, renderer.runtime)
            name = (f"{safe_stem(face, 'face')}-{safe_stem(speech, 'speech')}-seed{settings.seed}"
                    f"-steps{settings.steps}-cfg{settings.cfg:g}-{key[:8]}")
            output = session.folder / "renders" / f"{name}.mp4"
            clips_dir = session.folder / "clips" / name
            clips_dir.mkdir(parents=True, exist_ok=True)
            output.parent.mkdir(parents=True, exist_ok=True)

            def on_step(clip_index, step, num_steps):
                if cancel.is_set():
                    raise Cancelled
                events.put(("step", clip_index, step, num_steps))

            def on_clip(clip):
                new = preset.clip_length - preset.motion_frames
                frames = geometry.new_frames(clip.frames, preset.motion_frames, num_frames - clip.index * new)
                path = clips_dir / f"clip_{clip.index + 1:05d}.mp4"
                with VideoWriter(path, preset.width, preset.height, fps=preset.fps, crop=crop) as writer:
                    writer.write(frames)
                events.put(("clip", clip.index, clip.num_clips, path))
                if cancel.is_set():
                    raise Cancelled

            renderer.render(Job(Path(face), Path(speech), output, prompt), on_clip=on_clip, on_step=on_step)
            return name, output

    def render(self, session: Session, face, speech, prompt, seed, steps, cfg, memory, vae_tiling, progress=None):
        """Generator for the page: yields ``(video, clips, status, renders)`` updates (``None`` = unchanged);
        the last one has the mp4. Raises :class:`Hallo3Error` with the one-line message for bad inputs."""
        if face is None:
            raise UsageError("upload a portrait first")
        if speech is None:
            raise UsageError("upload or record the speech first")
        face, speech = str(face), str(speech)
        from hallo3_cli.image_io import load_image

        load_image(face)  # bad inputs fail here, in one line, before any model work
        check_speech(speech, self.max_speech_seconds)
        settings = self.settings(seed, steps, cfg)
        prompt = prompt.strip() if isinstance(prompt, str) and prompt.strip() else None

        events: queue.Queue = queue.Queue()
        outcome: dict = {}
        cancel = threading.Event()
        session.jobs.add(cancel)

        def work():
            try:
                outcome["result"] = self.render_events(session, face, speech, prompt, settings, memory, vae_tiling,
                                                       events, cancel)
            except Cancelled:
                outcome["cancelled"] = True
            except BaseException as err:  # reported to the page in one line
                if not isinstance(err, Hallo3Error):
                    log.exception("render failed")
                outcome["error"] = err
            finally:
                session.jobs.discard(cancel)
                if session.ended:  # the tab closed while this job finished its step: remove what it wrote since
                    shutil.rmtree(session.folder, ignore_errors=True)
                events.put(("end",))

        worker = threading.Thread(target=work, name="hallo3-render", daemon=True)
        started = time.monotonic()
        total, clips, resumed = None, [], 0
        stepping_since, fresh_steps = None, 0
        status = "waiting for the GPU"
        current = None
        worker.start()
        try:
            last = 0.0
            ended = False
            while not ended:
                try:
                    event = events.get(timeout=UPDATE_INTERVAL)
                except queue.Empty:
                    event = None
                while event is not None:
                    kind = event[0]
                    if kind == "end":
                        ended = True
                    elif kind == "status":
                        status = event[1]
                    elif kind == "total":
                        total = event[1]
                    elif kind == "step":
                        _, clip_index, step, num_steps = event
                        if stepping_since is None:
                            stepping_since = time.monotonic()
                        fresh_steps += 1
                        current = (clip_index, step, num_steps)
                    elif kind == "clip":
                        _, index, total, path = event
                        clips.append((str(path), f"clip {index + 1}/{total}"))
                        if stepping_since is None:
                            resumed += 1
                    try:
                        event = events.get_nowait()
                    except queue.Empty:
                        event = None
                now = time.monotonic()
                if ended or now - last >= UPDATE_INTERVAL:
                    last = now
                    text = self._progress_text(status, total, clips, resumed, current, stepping_since, fresh_steps, settings.steps, now)
                    if progress is not None and total and current is not None:
                        done = (current[0] * settings.steps + current[1] + 1) / (total * settings.steps)
                        progress(min(done, 1.0), desc=text)
                    if not ended:
                        yield None, list(clips), text, None
        finally:
            # The client went away, or Gradio cancelled the event: Gradio closes this generator on its event loop,
            # so nothing here may wait for the worker (a step, a model load or a VAE decode would stall every
            # other client). The worker stops at its next check and frees the GPU lock; the next job waits for
            # that lock in its own worker thread.
            if worker.is_alive():
                cancel.set()
        elapsed = time.monotonic() - started
        if outcome.get("cancelled"):
            message = (f"cancelled: {len(clips)} of {total or '?'} clips finished and kept; "
                       "render again with the same settings to resume")
            yield None, list(clips), message, None
            raise Hallo3Error(message)
        if "error" in outcome:
            raise outcome["error"]
        name, output = outcome["result"]
        session.renders[name] = output
        kept = f", {resumed} resumed from the cache" if resumed else ""
        text = f"done: {len(clips)} clip{'s' if len(clips) != 1 else ''}{kept} in {elapsed:.1f} s — {output.name}"
        yield str(output), list(clips), text, name

    @staticmethod
    def _progress_text(status, total, clips, resumed, current, stepping_since, fresh_steps, steps, now) -> str:
        if current is None:
            return status + ("" if not clips else f" ({len(clips)} clips from the cache)")
        clip_index, step, num_steps = current
        text = f"clip {clip_index + 1}/{total} · step {step + 1}/{num_steps}"
        if resumed:
            text += f" · {resumed} resumed"
        if total and fresh_steps:
            per_step = (now - stepping_since) / fresh_steps
            left = (total - clip_index - 1) * steps + (num_steps - step - 1)
            text += f" · ETA {_duration(per_step * left)}"
        return text

    def reopen(self, session: Session, name: str | None) -> str | None:
        """A past render of this session, by its name in the list (never a path from the page)."""
        if not name:
            return None
        path = session.renders.get(name)
        if path is None or not path.is_file():
            raise UsageError(f"no render named {name!r} in this session")
        return str(path)

    def cancel(self, session: Session) -> str:
        running = bool(session.jobs)
        session.cancel()
        return ("cancelled after the current denoising step: finished clips are kept, Render resumes from them"
                if running else "nothing to cancel")


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"
