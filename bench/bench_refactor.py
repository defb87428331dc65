"""One-shot ``hallo3 render`` of this checkout against an older checkout, alternated in one run (a ratio).

    git worktree add /tmp/hallo3-before 720d19a          # the commit before Hallo3Pipeline
    python bench/bench_refactor.py --before /tmp/hallo3-before --runs 3

Each run is a fresh process rendering the same portrait and speech (``--seconds`` of it) with a fresh
cache folder, so nothing is reused; the two checkouts alternate (before, after, before, ...) so that load
on a shared machine affects both alike. Prints the median wall seconds of each and their ratio, and
checks that both wrote a video with the same number of frames.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_render import cut_wav  # noqa: E402

HERE = Path(__file__).resolve().parents[1]
MEDIA = HERE.parent / "shared" / "fixtures" / "media"


def render(checkout: Path, face: Path, speech: Path, out: Path, model: str) -> float:
    env = {**os.environ, "PYTHONPATH": str(checkout), "HALLO3_PRESETS": str(HERE / "tests" / "presets_test.toml")}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "hallo3_cli", "render", str(face), str(speech), "-o", str(out), "--model", model,
                    "--seed", "1", "--cache-dir", str(out.with_suffix(".cache")), "-q"], check=True, env=env,
                   capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, required=True, help="a checkout of the older commit")
    parser.add_argument("--model", default="tiny-random")
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    from hallo3_cli.video_io import read_video

    times = {"before": [], "after": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        speech = cut_wav(MEDIA / "speech_0001.wav", tmp / "speech.wav", args.seconds)
        frames = {}
        for run in range(args.runs):
            for name, checkout in (("before", args.before), ("after", HERE)):
                out = tmp / f"{name}{run}.mp4"
                times[name].append(render(checkout, MEDIA / "face_0001.jpg", speech, out, args.model))
                frames[name] = read_video(out)[0].shape
    before, after = statistics.median(times["before"]), statistics.median(times["after"])
    print(f"model {args.model}, {args.seconds:g} s of speech, {args.runs} alternated runs each")
    for name in ("before", "after"):
        print(f"{name:>6}: median {statistics.median(times[name]):.2f} s ({', '.join(f'{t:.2f}' for t in times[name])}), "
              f"video {frames[name]}")
    print(f" ratio after/before: {after / before:.3f}")
    assert frames["before"] == frames["after"], frames


if __name__ == "__main__":
    main()
