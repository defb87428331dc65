"""End to end on real portraits and recordings with a tiny random model (preset ``tiny-test``).

One-shot render, the stage-file path (CLI), interruption and resume, cache reuse, batch jobs under
torchrun, and concurrent processes on one cache folder.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hallo3_cli.video_io import read_video
from conftest import cut_wav

pytestmark = pytest.mark.slow

PRESETS = Path(__file__).with_name("presets_test.toml")
MODEL = "tiny-test"


@pytest.fixture(scope="module", autouse=True)
def test_presets():
    old = os.environ.get("HALLO3_PRESETS")
    os.environ["HALLO3_PRESETS"] = str(PRESETS)
    yield
    if old is None:
        os.environ.pop("HALLO3_PRESETS")
    else:
        os.environ["HALLO3_PRESETS"] = old


def run(*args: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "hallo3_cli", *args], capture_output=True, text=True, **kwargs)
    if check:
        assert result.returncode == 0, result.stderr[-2000:]
    return result


@pytest.fixture(scope="module")
def inputs(media_dir, tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("inputs")
    Image.open(media_dir / "face_0001.jpg").crop((0, 0, 480, 400)).save(root / "face.png")
    return {
        "square_face": media_dir / "face_0003.jpg",  # 480×480
        "face": root / "face.png",  # 480×400: cover and centre-crop, full frame out
        "two_clips": cut_wav(media_dir / "speech_0001.wav", root / "two.wav", 2.2),  # stereo 44.1 kHz, 55 frames
        "one_clip": cut_wav(media_dir / "speech_0003.wav", root / "one.wav", 1.2),  # 30 frames
        "one_clip_b": cut_wav(media_dir / "speech_0008.wav", root / "one_b.wav", 1.0),  # mono 48 kHz, 25 frames
    }


@pytest.fixture(scope="module")
def one_shot(inputs, tmp_path_factory):
    from hallo3_cli.jobs import render_video

    root = tmp_path_factory.mktemp("one_shot")
    out = render_video(inputs["square_face"], inputs["two_clips"], root / "out.mp4", model=MODEL, seed=3,
                       cache_dir=root / "cache", progress=False)
    return out, root / "cache"


def video_frames(speech: Path) -> int:
    """The official frame count: ``ceil(samples / 16000 * 25)`` in floating point (docs/model.md §5.3)."""
    from hallo3_cli.audio_io import load_audio

    return math.ceil(len(load_audio(speech)) / 16000 * 25)


def test_one_shot_render_writes_the_video(one_shot, inputs):
    out, cache = one_shot
    frames, fps, audio_duration = read_video(out)
    n = video_frames(inputs["two_clips"])
    assert n in (55, 56)  # 2.2 s; float rounding in the official formula gives 56
    assert fps == 25
    assert frames.shape == (n, 64, 64, 3)  # square input → square output
    assert abs(audio_duration - 2.2) <= 1 / 25  # the speech, trimmed to the video
    assert frames.std() > 1  # noise, but not a constant image
    import av

    with av.open(str(out)) as container:
        assert container.streams.video[0].codec_context.name == "h264"
        assert container.streams.video[0].codec_context.pix_fmt == "yuv420p"
        assert container.streams.audio[0].codec_context.name == "aac"
    assert len(list(cache.glob("*.audio.safetensors"))) == 1 and len(list(cache.glob("*.ref.safetensors"))) == 1


def test_stage_path_gives_identical_frames(one_shot, inputs, tmp_path):
    features, ref, clips, video = (tmp_path / n for n in ("a.safetensors", "r.safetensors", "c.safetensors", "v.mp4"))
    result = run("embed-audio", str(inputs["two_clips"]), "-o", str(features), "--model", MODEL, "-q")
    assert result.stdout.strip() == str(features)
    run("encode-ref", str(inputs["square_face"]), "-o", str(ref), "--model", MODEL, "--preview", str(tmp_path / "p.png"), "-q")
    result = run("render", "--audio", str(features), "--ref", str(ref), "-o", str(clips), "--seed", "3", "-q")
    assert result.stdout.strip() == str(clips)
    assert not (tmp_path / "c.safetensors.parts").exists()
    run("stitch", str(clips), "--audio", str(inputs["two_clips"]), "-o", str(video), "-q")
    ours, _, _ = read_video(video)
    theirs, _, _ = read_video(one_shot[0])
    assert np.array_equal(ours, theirs)
    from PIL import Image

    assert Image.open(tmp_path / "p.png").size == (96, 64)


def test_interrupted_render_resumes_identically(one_shot, inputs, tmp_path, monkeypatch):
    from hallo3_cli.jobs import render_video
    from hallo3_cli.pipeline_hallo3 import Hallo3Pipeline

    original = Hallo3Pipeline.denoise
    calls = []

    def interrupted(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Hallo3Pipeline, "denoise", interrupted)
    out = tmp_path / "out.mp4"
    with pytest.raises(KeyboardInterrupt):
        render_video(inputs["square_face"], inputs["two_clips"], out, model=MODEL, seed=3, cache_dir=tmp_path / "c", progress=False)
    assert not out.exists() and not list(tmp_path.glob(".out.mp4*"))  # nothing partial
    assert len(list((tmp_path / "c").glob("*.parts/clip_*.safetensors"))) == 1

    monkeypatch.setattr(Hallo3Pipeline, "denoise", original)
    render_video(inputs["square_face"], inputs["two_clips"], out, model=MODEL, seed=3, cache_dir=tmp_path / "c", progress=False)
    assert np.array_equal(read_video(out)[0], read_video(one_shot[0])[0])


def test_same_render_again_only_decodes(one_shot, inputs, tmp_path, monkeypatch):
    from hallo3_cli.jobs import render_video
    from hallo3_cli.pipeline_hallo3 import Hallo3Pipeline

    def forbidden(*args, **kwargs):
        raise AssertionError("a cached render must not denoise again")

    monkeypatch.setattr(Hallo3Pipeline, "denoise", forbidden)
    out = render_video(inputs["square_face"], inputs["two_clips"], tmp_path / "again.mp4", model=MODEL, seed=3,
                       cache_dir=one_shot[1], progress=False)
    assert np.array_equal(read_video(out)[0], read_video(one_shot[0])[0])


def test_batch_under_torchrun_shards_jobs_and_reports_failures(inputs, tmp_path):
    jobs = tmp_path / "jobs" / "jobs.txt"
    jobs.parent.mkdir()
    (jobs.parent / "face.png").write_bytes(inputs["face"].read_bytes())  # relative paths resolve to the file's folder
    (jobs.parent / "a.wav").write_bytes(inputs["one_clip"].read_bytes())
    (jobs.parent / "b.wav").write_bytes(inputs["one_clip_b"].read_bytes())
    jobs.write_text("A talk@@face.png@@a.wav\nA talk@@face.png@@b.wav\nA talk@@missing.jpg@@a.wav\n")
    out_dir = tmp_path / "renders" / "videos"  # created by the batch (both ranks race to make it)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "--no-python", sys.executable, "-m", "hallo3_cli",
         "render", "--batch", str(jobs), "--out-dir", str(out_dir), "--model", MODEL, "-q"],
        capture_output=True, text=True, env=env, cwd=tmp_path,
    )
    assert result.returncode != 0  # the missing image fails...
    errors = [line for line in result.stderr.splitlines() if line.startswith("hallo3: error:")]
    assert len(errors) == 1 and "missing.jpg" in errors[0]  # (torchrun adds its own summary of the failed rank)
    videos = sorted(p.name for p in out_dir.glob("*.mp4"))
    assert [v.rsplit("-", 1)[0] for v in videos] == ["face-a-seed_42", "face-b-seed_42"]  # ...the others still run
    assert read_video(out_dir / videos[0])[0].shape[0] == video_frames(inputs["one_clip"])
    assert read_video(out_dir / videos[1])[0].shape[0] == video_frames(inputs["one_clip_b"])

    # A rerun skips finished outputs (no rendering: fast) and still reports the failing line.
    before = {p: p.stat().st_mtime_ns for p in out_dir.glob("*.mp4")}
    again = run("render", "--batch", str(jobs), "--out-dir", str(out_dir), "--model", MODEL, "-q", check=False)
    assert again.returncode != 0
    assert {p: p.stat().st_mtime_ns for p in out_dir.glob("*.mp4")} == before


def test_concurrent_processes_share_one_cache(inputs, tmp_path):
    cache = tmp_path / "cache"
    lines = "\n".join(f"{inputs['face']} {inputs['one_clip_b']} {tmp_path / f'out{seed}.mp4'} {seed}" for seed in (1, 2))
    script = f'{sys.executable} -m hallo3_cli render "$0" "$1" -o "$2" --seed "$3" --model {MODEL} --cache-dir {cache} -q'
    result = subprocess.run(
        ["xargs", "-P", "2", "-L", "1", "sh", "-c", script],
        input=lines, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    a, b = read_video(tmp_path / "out1.mp4")[0], read_video(tmp_path / "out2.mp4")[0]
    assert a.shape == b.shape == (video_frames(inputs["one_clip_b"]), 64, 96, 3) and not np.array_equal(a, b)
    assert len(list(cache.glob("*.ref.safetensors"))) == 1  # computed once, shared
    assert len(list(cache.glob("*.audio.safetensors"))) == 1
    assert not list(cache.glob("**/*.tmp*"))


def test_bad_render_inputs_fail_cleanly(inputs, tmp_path, one_shot):
    """Bad inputs: one-line errors naming the file, nothing written."""
    from hallo3_cli.errors import InputError, StageFileError
    from hallo3_cli.jobs import render_clips, render_video

    text = tmp_path / "face.png"
    text.write_text("not an image\n")
    with pytest.raises(InputError, match="face.png"):
        render_video(text, inputs["one_clip"], tmp_path / "o.mp4", model=MODEL, cache_dir=tmp_path / "c", progress=False)
    tiny = tmp_path / "tiny.png"
    from PIL import Image

    Image.new("RGB", (16, 16), (90, 60, 40)).save(tiny)
    with pytest.raises(InputError, match="tiny.png"):
        render_video(tiny, inputs["one_clip"], tmp_path / "o.mp4", model=MODEL, cache_dir=tmp_path / "c", progress=False)
    short = cut_wav(inputs["one_clip"], tmp_path / "short.wav", 0.02)  # shorter than one video frame
    with pytest.raises(InputError, match="short.wav"):
        render_video(inputs["face"], short, tmp_path / "o.mp4", model=MODEL, cache_dir=tmp_path / "c", progress=False)
    assert not (tmp_path / "o.mp4").exists()

    # Stage files made by another preset are refused before anything renders.
    cache = one_shot[1]
    audio = next(cache.glob("*.audio.safetensors"))
    ref = next(cache.glob("*.ref.safetensors"))
    with pytest.raises(StageFileError, match="tiny-random"):
        render_clips(audio, ref, tmp_path / "clips.safetensors", model="tiny-random", progress=False)
    assert not (tmp_path / "clips.safetensors").exists()


def test_batch_output_folder_that_cannot_be_made(tmp_path):
    """--out-dir is created when missing; one that cannot be made fails before any model loads."""
    from hallo3_cli.errors import OutputError
    from hallo3_cli.jobs import render_batch

    jobs = tmp_path / "jobs.txt"
    jobs.write_text("")
    assert render_batch(jobs, tmp_path / "new" / "videos", model=MODEL) == ([], [])
    assert (tmp_path / "new" / "videos").is_dir()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError) as err:
        render_batch(jobs, blocker / "videos", model=MODEL)
    assert str(blocker / "videos") in str(err.value) and "\n" not in str(err.value)


def test_render_eval_scores_the_finished_video(one_shot, inputs, tmp_path):
    """``render --eval`` (here a cached render, so it only decodes) runs ``hallo3 eval`` on the
    tiny-random video and writes OUT.eval.json next to it."""
    import json

    from hallo3_cli.audio_io import load_audio

    out = tmp_path / "scored.mp4"
    result = run("render", str(inputs["square_face"]), str(inputs["two_clips"]), "-o", str(out), "--model", MODEL,
                 "--seed", "3", "--cache-dir", str(one_shot[1]), "--eval", "-q")
    scores = tmp_path / "scored.eval.json"
    assert result.stdout.split() == [str(out), str(scores)]
    data = json.loads(scores.read_text())
    frames = read_video(out)[0].shape[0]
    assert data["frames"] == frames and data["model"] == MODEL and data["audio"] == str(inputs["two_clips"])
    assert data["windows"] == min(frames, len(load_audio(inputs["two_clips"])) // 640) - 5
    assert data["sync_distance"] > 0 and len(data["per_second"]["sync_confidence"]) == math.ceil(data["windows"] / 25)
