"""Disk and time of ``hallo3 prepare`` per minute of video at the release's geometry (frames squashed to 480×480).

1. Bytes per stored frame on the shared real portraits (480×480, moved by a sub-pixel drift per frame, as a head
   moves): JPEG quality 95 and 90 with full-resolution chroma (the default: 95), and lossless PNG.
2. The other files from their shapes at production size: wav2vec features (12 × 768 float32 per frame), the face
   file (480×480 mask + 17 bytes per frame), the prompt (226 × 4096, bfloat16 on CUDA, float32 on a CPU).
3. An end-to-end ``prepare`` of a synthetic 480×480 talking-head video (``tests/synthetic_video.py``) with a
   random preset at 480×720 (tiny networks, no face models): the frames file it wrote and the time per frame of
   decoding, squashing and compressing on this machine.

    python bench/bench_prepare.py [--seconds 8]   (at most 9.5: the speech fixture is 9.8 s)
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
MEDIA = REPO.parent / "shared" / "fixtures" / "media"
FPS = 25
PER_MINUTE = FPS * 60


def frame_bytes(frames_per_portrait: int = 50) -> dict[str, float]:
    """Mean bytes of one 480×480 frame per codec, over the three portraits."""
    sizes: dict[str, list[int]] = {"jpeg q95": [], "jpeg q90": [], "png": []}
    for name in ("face_0001.jpg", "face_0003.jpg", "face_0008.jpg"):
        portrait = Image.open(MEDIA / name).convert("RGB").resize((480, 480), Image.BICUBIC)
        for k in range(frames_per_portrait):
            dx, dy = 2.0 * np.sin(k / 7), 1.5 * np.cos(k / 11)
            frame = portrait.transform(portrait.size, Image.AFFINE, (1, 0, -dx, 0, 1, -dy), resample=Image.BICUBIC)
            for codec, options in (("jpeg q95", {"format": "JPEG", "quality": 95, "subsampling": 0}),
                                   ("jpeg q90", {"format": "JPEG", "quality": 90, "subsampling": 0}),
                                   ("png", {"format": "PNG", "compress_level": 6})):
                buffer = io.BytesIO()
                frame.save(buffer, **options)
                sizes[codec].append(len(buffer.getvalue()))
    return {codec: float(np.mean(values)) for codec, values in sizes.items()}


def end_to_end(seconds: float) -> tuple[int, int, float]:
    """(frames, bytes of the frames file, seconds per frame) of preparing a synthetic video at 480×480."""
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import cut_wav
    from synthetic_video import make_video

    from hallo3_cli.training import prepare_dataset

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        table = (REPO / "tests" / "presets_test.toml").read_text().replace("[tiny-test", "[bench-480")
        table = table.replace("height = 64", "height = 480").replace("width = 96", "width = 720")
        (tmp / "presets.toml").write_text(table)
        os.environ["HALLO3_PRESETS"] = str(tmp / "presets.toml")
        speech = cut_wav(MEDIA / "speech_0001.wav", tmp / "speech.wav", seconds + 0.5)
        video = make_video(tmp / "talk.mp4", MEDIA / "face_0001.jpg", speech, seconds=seconds, width=480, height=480)
        started = time.perf_counter()
        result = prepare_dataset([video], tmp / "data", model="bench-480", prompt="A person talking.", progress=False)
        spent = time.perf_counter() - started
        frames = result.kept[0].num_frames
        size = (tmp / "data" / "items" / "talk" / "frames.safetensors").stat().st_size
    return frames, size, spent / frames


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=8.0)
    args = parser.parse_args()
    mb = 1e6
    per_frame = frame_bytes()
    audio = 12 * 768 * 4
    print("| stored frame (480×480) | bytes per frame | MB per minute |\n|---|---:|---:|")
    for codec, size in per_frame.items():
        print(f"| {codec} | {size:,.0f} | {size * PER_MINUTE / mb:.1f} |")
    print(f"| audio features (12 × 768 float32) | {audio:,} | {audio * PER_MINUTE / mb:.1f} |")
    print(f"| face boxes + found | 17 | {17 * PER_MINUTE / mb:.3f} |")
    print(f"\nper video: face mask {480 * 480 / mb:.2f} MB, prompt {226 * 4096 * 2 / mb:.2f} MB (bf16) / "
          f"{226 * 4096 * 4 / mb:.2f} MB (float32)")
    total = (per_frame["jpeg q95"] + audio + 17) * PER_MINUTE / mb
    print(f"total per minute with the default JPEG q95: {total:.0f} MB (+ {(480 * 480 + 226 * 4096 * 2) / mb:.1f} MB per video)")
    frames, size, seconds_per_frame = end_to_end(args.seconds)
    print(f"\nend to end, synthetic {args.seconds:g} s 480×480 video: {frames} frames, frames file {size / frames:,.0f} "
          f"bytes per frame, {seconds_per_frame * 1e3:.0f} ms per frame (decode, squash, JPEG, tiny wav2vec/T5, "
          f"no face models; load average {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
