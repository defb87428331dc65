"""Progress on stderr: tqdm bars on a terminal, one line per clip (with ETA) in logs."""

from __future__ import annotations

import sys
import time


class Progress:
    """Clip and step progress of a render. ``step``/``start_clip`` have the signatures of
    ``Hallo3Pipeline``'s ``callback_on_step_end`` / ``callback_on_clip_start``."""

    def __init__(self, enabled: bool, clips: int, steps: int, done: int = 0):
        self.enabled, self.clips, self.done, self.started = enabled, clips, done, time.perf_counter()
        self.fresh = 0
        self.clip_bar = self.step_bar = None
        self.interactive = enabled and sys.stderr.isatty()
        if self.interactive:
            from tqdm import tqdm

            self.clip_bar = tqdm(total=clips, initial=done, desc="clips", unit="clip", file=sys.stderr, position=0)
            self.step_bar = tqdm(total=steps, desc="steps", unit="step", file=sys.stderr, position=1, leave=False)
        elif enabled and done:
            print(f"hallo3: resuming after {done}/{clips} finished clips", file=sys.stderr, flush=True)

    def start_clip(self, pipe, index: int, total: int) -> None:
        if self.step_bar is not None:
            self.step_bar.reset()
            self.step_bar.set_description(f"clip {index + 1} steps")

    def step(self, *_) -> dict:
        if self.step_bar is not None:
            self.step_bar.update()
        return {}

    def finish_clip(self) -> None:
        self.done += 1
        self.fresh += 1
        if self.clip_bar is not None:
            self.clip_bar.update()
        elif self.enabled:
            spent = time.perf_counter() - self.started
            eta = spent / self.fresh * (self.clips - self.done)
            print(f"hallo3: clip {self.done}/{self.clips} done ({spent:.0f} s so far, ETA {eta:.0f} s)", file=sys.stderr, flush=True)

    def close(self) -> None:
        for bar in (self.step_bar, self.clip_bar):
            if bar is not None:
                bar.close()


def bar(enabled: bool, total: int, desc: str, unit: str = "clip"):
    """A plain tqdm bar on stderr (disabled: a no-op bar)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=not enabled)
