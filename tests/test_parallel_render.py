"""``hallo3 render --parallel video`` under torchrun on CPU/gloo (issue 11): a 2-clip render on 2, 3 and 4
processes gives the single-process latents (fp32), in both forms of ``render``; a bad split, a launch
without torchrun and a failing rank stop cleanly with one message and no output."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import cut_wav

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
MODEL = "tiny-par"
TOLERANCE = 1e-5  # × max|single-process latents| (issue 11, fp32)


def _presets(root: Path) -> Path:
    """tiny-test at 32×48: the same tiny networks, a quarter of the VAE work per clip."""
    text = (REPO / "tests" / "presets_test.toml").read_text()
    text = text.replace("[tiny-test", f"[{MODEL}").replace("height = 64", "height = 32").replace("width = 96", "width = 48")
    path = root / "presets.toml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def setup(media_dir, tmp_path_factory):
    """Presets, inputs, stage files and the single-process render (clips file) they all compare with."""
    from safetensors.torch import load_file

    root = tmp_path_factory.mktemp("parallel_render")
    old = os.environ.get("HALLO3_PRESETS")
    os.environ["HALLO3_PRESETS"] = str(_presets(root))
    try:
        from hallo3_cli.jobs import embed_audio, encode_reference, render_clips

        face = media_dir / "face_0003.jpg"
        speech = cut_wav(media_dir / "speech_0001.wav", root / "two.wav", 2.2)  # 55 frames: 2 clips
        audio = embed_audio(speech, root / "a.safetensors", model=MODEL, progress=False)
        ref = encode_reference(face, root / "r.safetensors", model=MODEL)
        single = render_clips(audio, ref, root / "single.safetensors", progress=False)
        yield {"root": root, "face": face, "speech": speech, "audio": audio, "ref": ref,
               "latents": load_file(single)["latents"], "env": _env(root)}
    finally:
        if old is None:
            os.environ.pop("HALLO3_PRESETS", None)
        else:
            os.environ["HALLO3_PRESETS"] = old


def _env(root: Path) -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1", "HALLO3_PRESETS": str(root / "presets.toml")}


def torchrun(setup, ranks: int, *args: str, worker: list[str] | None = None, timeout: int = 240):
    target = [str(REPO / "tests" / "parallel_render_worker.py"), *worker, "--"] if worker else ["-m", "hallo3_cli"]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--standalone",
               *target, *args]
    return subprocess.run(command, env=setup["env"], capture_output=True, text=True, timeout=timeout)


def hallo3_lines(stderr: str) -> list[str]:
    """Our failure messages (torchrun adds its own report of a failed worker; warnings are not failures)."""
    ours = ("hallo3: error", "hallo3: interrupted", "hallo3: terminated", "Error: ", "Usage: ")
    return [line for line in stderr.splitlines() if line.lstrip("[rank0123]: ").startswith(ours)]


def assert_same_latents(latents: torch.Tensor, expected: torch.Tensor) -> None:
    assert latents.shape == expected.shape == (2, 13, 16, 4, 6)
    assert (latents - expected).abs().max() <= TOLERANCE * expected.abs().max()


def _clips(setup, out: Path, ranks: int, *options: str):
    run = torchrun(setup, ranks, "render", "--audio", str(setup["audio"]), "--ref", str(setup["ref"]), "-o", str(out),
                   "-q", "--parallel", "video", *options)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split() == [str(out)]  # the result once, from rank 0
    assert not out.with_name(out.name + ".parts").exists()
    from safetensors.torch import load_file

    return load_file(out)["latents"]


def test_failing_rank_stops_all_with_one_message_then_resume_on_two_ranks_cfg(setup):
    """Rank 1 fails on the first step of clip 2: every rank stops, one message, no clips file; clip 1
    stays persisted and the same command on 2 ranks (CFG parallel) resumes to the single-process latents."""
    out = setup["root"] / "cfg" / "clips.safetensors"
    out.parent.mkdir()
    args = ["render", "--audio", str(setup["audio"]), "--ref", str(setup["ref"]), "-o", str(out), "-q",
            "--parallel", "video"]
    run = torchrun(setup, 2, *args, worker=["1", "3"])  # 2 steps per clip: call 3 = clip 2, step 1
    assert run.returncode != 0
    lines = hallo3_lines(run.stderr)
    assert len(lines) == 1 and "injected failure on rank 1" in lines[0], run.stderr[-3000:]
    assert run.stdout == ""
    assert not out.exists()
    assert [p.name for p in out.parent.iterdir() if not p.name.startswith(".")] == ["clips.safetensors.parts"]
    assert [p.name for p in (out.parent / "clips.safetensors.parts").iterdir()] == ["clip_00000.safetensors"]

    assert_same_latents(_clips(setup, out, 2), setup["latents"])  # cfg 2 × ulysses 1 × ring 1, resumed


def test_two_ranks_sequence_only(setup):
    out = setup["root"] / "seq2.safetensors"
    assert_same_latents(_clips(setup, out, 2, "--no-cfg-parallel"), setup["latents"])  # ulysses 2 (2 heads)


def test_three_ranks(setup):
    out = setup["root"] / "three.safetensors"
    assert_same_latents(_clips(setup, out, 3), setup["latents"])  # 3 does not divide 2 heads: ring 3


def test_four_ranks_face_and_speech_to_mp4(setup):
    """cfg 2 × ulysses 2 from a portrait and a recording: rank 0 computes the stage files, the mp4 is
    written once, and the clips it kept in the cache are the single-process latents."""
    from safetensors.torch import load_file

    from hallo3_cli.video_io import read_video

    out, cache = setup["root"] / "four" / "out.mp4", setup["root"] / "four" / "cache"
    out.parent.mkdir()
    run = torchrun(setup, 4, "render", str(setup["face"]), str(setup["speech"]), "-o", str(out), "-m", MODEL, "--cache-dir",
                   str(cache), "-q", "--parallel", "video")
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split() == [str(out)]
    frames, fps, _ = read_video(out)
    assert frames.shape[0] in (55, 56) and fps == 25
    (parts,) = cache.glob("*.parts")
    latents = torch.stack([load_file(parts / f"clip_{i:05d}.safetensors")["latents"] for i in range(2)])
    assert_same_latents(latents, setup["latents"])
    assert len(list(cache.glob("*.audio.safetensors"))) == 1 and len(list(cache.glob("*.ref.safetensors"))) == 1


@pytest.mark.parametrize("rank", ["0", "1"])
def test_impossible_split_fails_before_loading_with_one_message(setup, rank, monkeypatch, capsys):
    """As rank 0 and rank 1 of 2 processes: the split is refused before the process group or any model
    (exit 2); rank 0 names the valid splits, rank 1 says nothing (the same check fails there alike)."""
    from hallo3_cli import cli

    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", "2")
    out = setup["root"] / "bad.safetensors"
    with pytest.raises(SystemExit) as exit_:
        cli.main(["render", "--audio", str(setup["audio"]), "--ref", str(setup["ref"]), "-o", str(out),
                  "--parallel", "video", "--ring", "3"])
    assert exit_.value.code == 2
    err = hallo3_lines(capsys.readouterr().err)
    if rank == "1":
        assert err == []
    else:
        assert len(err) == 1 and "--ring 3" in err[0]
        valid = err[0].split("valid: ")[1].split("; ")
        assert sorted(valid) == ["cfg 1 × ulysses 1 × ring 2", "cfg 1 × ulysses 2 × ring 1", "cfg 2 × ulysses 1 × ring 1"]
    import torch.distributed as dist

    assert not dist.is_initialized()
    assert not out.exists() and not out.with_name(out.name + ".parts").exists()


def test_parallel_video_without_torchrun_says_how_to_launch(setup, monkeypatch, capsys):
    from hallo3_cli import cli

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    out = setup["root"] / "alone.safetensors"
    with pytest.raises(SystemExit) as exit_:
        cli.main(["render", "--audio", str(setup["audio"]), "--ref", str(setup["ref"]), "-o", str(out),
                  "--parallel", "video"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "torchrun --nproc-per-node N --no-python hallo3 render ... --parallel video" in err[0]
    assert not out.exists()


@pytest.mark.parametrize(("args", "message"), [
    (["--ulysses", "2"], "need --parallel video"),
    (["--parallel", "jobs"], "--parallel jobs shares the jobs of --batch"),
])
def test_parallel_options_are_checked_while_parsing(setup, args, message, capsys):
    from hallo3_cli import cli

    with pytest.raises(SystemExit) as exit_:
        cli.main(["render", "--audio", str(setup["audio"]), "--ref", str(setup["ref"]), "-o",
                  str(setup["root"] / "x.safetensors"), *args])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
