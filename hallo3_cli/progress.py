"""Progress on stderr: tqdm bars on a terminal, lines with an ETA in logs; both say what is happening
(resuming, rendering, decoding), not only how far."""

from __future__ import annotations

import sys
import time

#: In logs (stderr not a terminal), a line about the clip under way at most this often (seconds).
LOG_EVERY = 30.0


class Progress:
    """Clip and step progress of a render. ``step``/``start_clip`` have the signatures of
    ``Hallo3Pipeline``'s ``callback_on_step_end`` / ``callback_on_clip_start``.

    The ETA counts only the clips rendered in this run, from the start of the first of them: loading the
    networks before it and decoding resumed clips are not rendering time (they made early ETAs several
    times too long). ``decode_resumed``: the finished clips of a resume are decoded again (into an mp4)
    before the first fresh clip, which is said, with each of them as it is done.
    """

    def __init__(self, enabled: bool, clips: int, steps: int, done: int = 0, *, decode_resumed: bool = False):
        self.enabled, self.clips, self.steps, self.done = enabled, clips, steps, done
        self.resumed = done
        self.fresh = 0
        self.first_start: float | None = None
        self.current = done
        self.steps_done = 0
        self.last_line = time.perf_counter()
        self.clip_bar = self.step_bar = None
        self.interactive = enabled and sys.stderr.isatty()
        if self.interactive:
            from tqdm import tqdm

            self.clip_bar = tqdm(total=clips, initial=done, desc="clips", unit="clip", file=sys.stderr, position=0)
            self.step_bar = tqdm(total=steps, desc="steps", unit="step", file=sys.stderr, position=1, leave=False)
        if enabled and done:
            then = " (decoding them into the video first)" if decode_resumed and done else ""
            self._say(f"resuming after {done}/{clips} finished clips{then}")

    def _say(self, text: str) -> None:
        self.last_line = time.perf_counter()
        if self.clip_bar is not None:
            self.clip_bar.write(f"hallo3: {text}", file=sys.stderr)
        else:
            print(f"hallo3: {text}", file=sys.stderr, flush=True)

    def _due(self) -> bool:
        return not self.interactive and self.enabled and time.perf_counter() - self.last_line >= LOG_EVERY

    def eta(self) -> float | None:
        """Seconds left: the mean time of this run's finished clips times the clips left (None before one)."""
        if not self.fresh or self.first_start is None:
            return None
        return (time.perf_counter() - self.first_start) / self.fresh * (self.clips - self.done)

    def resumed_clip(self, index: int) -> None:
        """A finished clip of a resume was decoded again."""
        if self.step_bar is not None:
            self.step_bar.set_description(f"decoded finished clip {index + 1}/{self.clips}")
        elif self._due() or (self.enabled and index + 1 == self.resumed):
            self._say(f"decoded finished clip {index + 1}/{self.resumed}")

    def start_clip(self, pipe, index: int, total: int) -> None:
        self.current = index
        self.steps_done = 0
        if self.first_start is None:
            self.first_start = time.perf_counter()
        if self.step_bar is not None:
            self.step_bar.reset()
            self.step_bar.set_description(f"clip {index + 1} denoising")
        elif self.enabled and self.fresh == 0:
            self._say(f"rendering clip {index + 1}/{self.clips} ({self.steps} denoising steps, then a VAE decode)")

    def step(self, *_) -> dict:
        if self.step_bar is not None:
            self.step_bar.update()
            if self.step_bar.n >= self.step_bar.total:
                self.step_bar.set_description(f"clip {self.current + 1} decoding (VAE)")
        self.steps_done += 1
        if self._due():
            eta = self.eta()
            doing = "decoding (VAE)" if self.steps_done >= self.steps else f"step {self.steps_done}/{self.steps} done"
            self._say(f"clip {self.current + 1}/{self.clips}: {doing}" + (f" (ETA {eta:.0f} s)" if eta is not None else ""))
        return {}

    def finish_clip(self) -> None:
        self.done += 1
        self.fresh += 1
        if self.clip_bar is not None:
            self.clip_bar.update()
        elif self.enabled:
            spent = time.perf_counter() - (self.first_start or time.perf_counter())
            eta = self.eta() or 0.0
            self._say(f"clip {self.done}/{self.clips} done ({spent:.0f} s rendering so far, ETA {eta:.0f} s)")

    def close(self) -> None:
        for bar in (self.step_bar, self.clip_bar):
            if bar is not None:
                bar.close()


def bar(enabled: bool, total: int, desc: str, unit: str = "clip"):
    """A plain tqdm bar on stderr (disabled: a no-op bar)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=not enabled)
