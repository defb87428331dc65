"""Never destroy what the user has (issue 14): outputs, numbers, stage-file shapes, batch names,
exit codes, audio headers, the README's xargs line and lock files. Fast: nothing here renders."""

from __future__ import annotations

import hashlib
import inspect
import os
import re
import subprocess
import sys
import threading
import time
import wave
from pathlib import Path

import numpy as np
import pytest
import torch

from hallo3_cli import fsutil, stages
from hallo3_cli.cli import main
from hallo3_cli.errors import InputError, NonFiniteError, OutputError, StageFileError
from hallo3_cli.networks import network_widths
from hallo3_cli.presets import get_preset

REPO = Path(__file__).resolve().parents[1]
PRESETS = Path(__file__).with_name("presets_test.toml")


def cli(*argv: str, capsys) -> tuple[int, str, str]:
    """Run ``hallo3 ARGV`` in this process; (exit code, stdout, stderr)."""
    capsys.readouterr()
    try:
        main(list(argv))
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code, out, err, expected_code, *words):
    assert code == expected_code, (code, err)
    assert out == ""
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if line.startswith("hallo3: error:")]
    assert len(lines) == 1 and len(err.strip().splitlines()) == 1, err
    for word in words:
        assert word in lines[0], (word, lines[0])


def write_wav(path: Path, seconds: float = 1.0, rate: int = 16000) -> Path:
    t = np.arange(int(seconds * rate))
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes((np.sin(t * 0.05) * 8000).astype("<i2").tobytes())
    return path


def snapshot(folder: Path) -> dict:
    """Every entry under ``folder`` (hidden ones too) with its content hash."""
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir")
            for p in sorted(folder.rglob("*"))}


@pytest.fixture
def media(tmp_path):
    write_wav(tmp_path / "s.wav")
    (tmp_path / "f.jpg").write_bytes(b"\xff\xd8 not really decoded: the checks come first")
    (tmp_path / "a.safetensors").write_bytes(b"audio stage stand-in")
    (tmp_path / "r.safetensors").write_bytes(b"reference stage stand-in")
    os.chdir(tmp_path)
    return tmp_path


# ---------------------------------------------------------------------------------------------
# 1. outputs


@pytest.mark.parametrize(
    "argv, words",
    [
        (["embed-audio", "s.wav", "-o", "s.wav"], ["s.wav", ".safetensors"]),
        (["render", "f.jpg", "s.wav", "-o", "s.wav"], ["s.wav", ".mp4"]),
        (["render", "f.jpg", "s.wav", "-o", "out.avi"], ["out.avi", ".mp4"]),
        (["stitch", "a.safetensors", "--audio", "s.wav", "-o", "out.txt"], [".mp4"]),
        (["render", "--audio", "a.safetensors", "--ref", "r.safetensors", "-o", "a.safetensors"], ["also an input"]),
        (["render", "--audio", "a.safetensors", "--ref", "r.safetensors", "-o", "sub/../r.safetensors"], ["also an input"]),
        (["render", "--audio", "a.safetensors", "--ref", "r.safetensors", "-o", "link.safetensors"], ["also an input"]),
        (["render", "--audio", "a.safetensors", "--ref", "r.safetensors", "-o", "hard.safetensors"], ["also an input"]),
        (["render", "--audio", "a.safetensors", "--ref", "r.safetensors", "-o", "clips.mp4"], [".safetensors"]),
        (["encode-ref", "f.jpg", "-o", "r2.safetensors", "--preview", "r2.safetensors"], [".png"]),
        (["encode-ref", "f.jpg", "-o", "r2.safetensors", "--preview", "f.jpg"], [".png"]),
        (["render", "f.jpg", "s.wav", "-o", "/dev/null"], ["/dev/null", "character device"]),
        (["embed-audio", "s.wav", "-o", "fifo.safetensors"], ["fifo"]),
        (["embed-audio", "s.wav", "-o", "folder.safetensors"], ["directory"]),
        (["render", "f.jpg", "s.wav", "-o", "out.mp4", "--cache-dir", "s.wav/cache"], ["s.wav", "not a folder"]),
    ],
)
def test_outputs_that_would_destroy_something_are_refused_before_any_work(media, capsys, argv, words):
    (media / "sub").mkdir()
    (media / "link.safetensors").symlink_to(media / "a.safetensors")
    os.link(media / "r.safetensors", media / "hard.safetensors")
    os.mkfifo(media / "fifo.safetensors")
    (media / "folder.safetensors").mkdir()
    before = snapshot(media)
    model = [] if argv[0] == "stitch" else ["--model", "tiny-random"]  # stitch reads the preset from its input
    one_line_error(*cli(*argv, *model, capsys=capsys), 4, *words)
    assert snapshot(media) == before  # nothing changed, nothing left behind (no cache, no lock, no temp)


def test_check_outputs_api(tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.safetensors"
    assert fsutil.check_outputs({b: fsutil.STAGE_SUFFIXES, a: fsutil.PREVIEW_SUFFIXES}) == [b, a]
    assert fsutil.check_outputs([(b, fsutil.STAGE_SUFFIXES), (None, fsutil.PREVIEW_SUFFIXES)]) == [b]
    (tmp_path / "x").mkdir()
    with pytest.raises(OutputError, match="another output"):
        fsutil.check_outputs([(b, None), (tmp_path / "x" / ".." / "b.safetensors", None)])
    with pytest.raises(OutputError, match="another output"):  # a mapping cannot hold equal keys: pairs can
        fsutil.check_outputs([(a, fsutil.PREVIEW_SUFFIXES), (str(a), fsutil.PREVIEW_SUFFIXES)])
    assert fsutil.check_outputs([(tmp_path / "UPPER.MP4", fsutil.VIDEO_SUFFIXES)])  # extensions: any case
    fsutil.check_output_path(tmp_path / "kept.safetensors")  # the old entry point still works


def test_failed_preview_leaves_no_main_output(tmp_path, monkeypatch, media_dir):
    from hallo3_cli import image_io
    from hallo3_cli.jobs import encode_reference

    monkeypatch.setenv("HALLO3_PRESETS", str(PRESETS))

    def broken(path, *args):
        Path(path).write_bytes(b"half a png")
        raise OutputError("disk full", path)

    monkeypatch.setattr(image_io, "write_preview", broken)
    with pytest.raises(OutputError, match="disk full"):
        encode_reference(media_dir / "face_0003.jpg", tmp_path / "r.safetensors", model="tiny-test", preview=tmp_path / "p.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # neither file, no temporaries


def test_temporary_names_fit_255_bytes(tmp_path):
    name = "é" * 60 + "x" * (255 - 120 - len(".safetensors")) + ".safetensors"  # a 255-byte legal name
    assert len(name.encode()) == 255
    with fsutil.atomic_path(tmp_path / name) as tmp:
        assert len(tmp.name.encode()) <= 255 and tmp.suffix == ".safetensors"
        tmp.write_bytes(b"data")
    assert (tmp_path / name).read_bytes() == b"data"
    assert [p.name for p in tmp_path.iterdir()] == [name]


def test_stale_temporaries_of_a_killed_writer_are_removed(tmp_path):
    out = tmp_path / "out.mp4"
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # a process id that is gone
    prefix, suffix = fsutil._temp_affixes(out)
    mine = prefix.rsplit(".", 2)[0]  # ".out.mp4" + host tag
    dead = tmp_path / f"{mine}.{fsutil._host_tag()}-{child.pid}.abcd1234{suffix}"
    alive = tmp_path / f"{mine}.{fsutil._host_tag()}-{os.getppid()}.abcd1234{suffix}"  # pytest's parent runs
    other_output = tmp_path / f".other.mp4.{fsutil._host_tag()}-{child.pid}.abcd1234{suffix}"
    user_file = tmp_path / ".out.mp4.notes"
    for path in (dead, alive, other_output, user_file):
        path.write_bytes(b"x")
    with fsutil.atomic_path(out) as tmp:
        tmp.write_bytes(b"video")
    assert not dead.exists()
    assert alive.exists() and other_output.exists() and user_file.exists()  # only ours, only the dead


def test_output_folder_that_cannot_be_created(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="cannot write files here"):
        fsutil.ensure_output_folder(tmp_path / "file" / "cache")
    with pytest.raises(OutputError, match="not a folder"):
        fsutil.check_output_folder(tmp_path / "file" / "cache")
    assert fsutil.check_output_folder(tmp_path / "new" / "deeper") and not (tmp_path / "new").exists()


# ---------------------------------------------------------------------------------------------
# 2. numbers, 5. exit codes


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["render", "f.jpg", "s.wav", "-o", "o.mp4", "--cfg", "nan"], "--cfg"),
        (["render", "f.jpg", "s.wav", "-o", "o.mp4", "--cfg", "inf"], "--cfg"),
        (["render", "f.jpg", "s.wav", "-o", "o.mp4", "--cfg", "1e30"], "--cfg"),
        (["render", "f.jpg", "s.wav", "-o", "o.mp4", "--cfg", "-1"], "--cfg"),
        (["render", "f.jpg", "s.wav", "-o", "o.mp4", "--cache", "nan"], "--cache"),
        (["render", "f.jpg", "s.wav", "-o", "o.mp4", "--cache", "1"], "--cache"),
        (["render", "f.jpg", "s.wav", "-o", "o.mp4", "--steps", "0"], "--steps"),
        (["convert", "src", "dest", "--shard-size", "nan"], "--shard-size"),
        (["convert", "src", "dest", "--shard-size", "0"], "--shard-size"),
        (["plan", "--height", "-5"], "--height"),
        (["plan", "--width", "100"], "multiple of 16"),
        (["render", "f.jpg", "s.wav", "-o", "o.mp4", "--offload", "fast"], "--offload"),
        (["stitch", "a.safetensors", "--audio", "s.wav", "-o", "o.mp4", "--offload", "fast"], "--offload"),
        (["render", "f.jpg", "s.wav", "-o", "o.mp4", "--weights-dtype", "int4"], "--weights-dtype"),
        (["render", "f.jpg", "s.wav", "-o", "o.mp4", "--dtype", "int8"], "--dtype"),
        (["doctor", "--dtype", "float64"], "--dtype"),
        (["render", "f.jpg", "s.wav", "-o", "o.mp4", "--device", "gpu"], "--device"),
        (["render", "f.jpg", "s.wav", "-o", "o.mp4", "--device", "cuda:x"], "--device"),
        (["render", "f.jpg", "s.wav", "-o", "o.mp4", "--compile", "--offload", "group"], "--compile"),
        (["render", "f.jpg", "s.wav", "-o", "o.mp4", "--compile", "--offload", "sequential"], "--compile"),
        (["plan", "--device-kind", "tpu"], "--device-kind"),
        (["embed-audio", "s.wav", "-o", "a2.safetensors", "--model", "bogus"], "hallo3, tiny-random"),
    ],
)
def test_invalid_option_values_are_usage_errors(media, capsys, argv, needle):
    before = snapshot(media)
    code, out, err = cli(*argv, capsys=capsys)
    assert code == 2, (code, err)
    assert out == "" and "Traceback" not in err and needle in err
    assert snapshot(media) == before


def test_unknown_model_with_stage_files_lists_the_presets(media, capsys):
    code, _, err = cli("render", "--audio", "a.safetensors", "--ref", "r.safetensors", "-o", "c.safetensors",
                       "--model", "bogus", capsys=capsys)
    assert code == 2 and "known presets: hallo3, tiny-random" in err
    assert "rerun" not in err and "--model bogus" not in err


def test_unusable_device_is_one_short_line(media, capsys):
    if torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    code, out, err = cli("render", "f.jpg", "s.wav", "-o", "o.mp4", "--model", "tiny-random", "--device", "mps", capsys=capsys)
    one_line_error(code, out, err, 2, "--device 'mps'")
    assert len(err) < 300


def test_debug_keeps_the_exit_code(media):
    result = subprocess.run([sys.executable, "-m", "hallo3_cli", "--debug", "render", "f.jpg", "s.wav", "-o", "/dev/null",
                             "--model", "tiny-random"], capture_output=True, text=True, cwd=media,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 4
    assert "Traceback" in result.stderr and result.stderr.strip().splitlines()[-1].startswith("hallo3: error: /dev/null")


def test_ctrl_c_is_interrupted_130(media, capsys, monkeypatch):
    from hallo3_cli import jobs

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(jobs, "stitch", interrupted)
    code, out, err = cli("stitch", "a.safetensors", "--audio", "s.wav", "-o", "o.mp4", capsys=capsys)
    assert code == 130 and err.strip().splitlines()[-1] == "hallo3: interrupted" and out == ""


def test_non_finite_error_names_clip_and_step():
    err = NonFiniteError.at(clip=3, step=17)
    assert err.exit_code == 1 and "clip 3, step 17" in str(err) and "\n" not in str(err)


# ---------------------------------------------------------------------------------------------
# 2./3. stage files: non-finite values, shapes against the preset, fingerprints


def tiny_audio_stage(path: Path, **changes) -> Path:
    preset = get_preset("tiny-random")
    widths = network_widths(preset)
    features = changes.pop("features", torch.randn(49, widths["audio_layers"], widths["audio_width"]))
    meta = {"model": preset.name, "params": {}, "source_sha256": "0" * 64, "fps": 25, "num_frames": 40,
            "clip_length": 49, "sample_rate": 16000}
    meta["weights"] = preset.fingerprint(*stages.weights_components(stages.AUDIO, preset, meta["params"]))
    meta.update(changes)
    return stages.save_stage(path, stages.AUDIO, {"features": features}, meta)


def tiny_reference_tensors(**changes) -> dict:
    preset = get_preset("tiny-random")
    w = network_widths(preset)
    h, wd = preset.height // 8, preset.width // 8
    tensors = {
        "image": torch.zeros(3, preset.height, preset.width),
        "ref_latent": torch.zeros(16, h, wd),
        "face_embedding": torch.zeros(512),
        "face_box": torch.tensor([0, 0, 8, 8], dtype=torch.int32),
        "prompt_embeds": torch.zeros(preset.text_length, w["text_width"]),
        "ref_bank": torch.zeros(w["dit_layers"], (h // 2) * (wd // 2), w["dit_width"]),
    }
    tensors.update(changes)
    return tensors


def save_reference(path: Path, tensors: dict) -> Path:
    preset = get_preset("tiny-random")
    meta = {"model": preset.name, "params": {}, "source_sha256": "0" * 64, "framing": "pad", "source_width": 10,
            "source_height": 10, "face_found": False, "prompt": "p",
            "weights": preset.fingerprint(*stages.weights_components(stages.REFERENCE, preset))}
    return stages.save_stage(path, stages.REFERENCE, tensors, meta)


def test_valid_tiny_stages_load(tmp_path):
    assert stages.load_stage(tiny_audio_stage(tmp_path / "a.safetensors"), stages.AUDIO)
    assert stages.load_stage(save_reference(tmp_path / "r.safetensors", tiny_reference_tensors()), stages.REFERENCE)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_stage_tensors_are_refused(tmp_path, bad):
    features = torch.randn(49, 2, 32)
    features[7, 1, 3] = bad
    path = tiny_audio_stage(tmp_path / "a.safetensors", features=features)
    with pytest.raises(StageFileError, match=r"'features' holds NaN or infinite") as caught:
        stages.load_stage(path, stages.AUDIO)
    assert str(path) in str(caught.value) and caught.value.exit_code == 3


@pytest.mark.parametrize(
    "name, tensor",
    [
        ("face_embedding", torch.zeros(128)),
        ("ref_bank", torch.zeros(3, 96, 128)),
        ("prompt_embeds", torch.zeros(100, 64)),
        ("ref_latent", torch.zeros(16, 8, 8)),
    ],
)
def test_reference_shapes_are_checked_against_the_preset(tmp_path, name, tensor):
    tensors = tiny_reference_tensors(**{name: tensor})
    if name == "ref_latent":
        tensors["image"] = torch.zeros(3, 64, 64)
    path = save_reference(tmp_path / "r.safetensors", tensors)
    with pytest.raises(StageFileError, match=f"tensor '{name if name != 'ref_latent' else 'image'}' has shape"):
        stages.load_stage(path, stages.REFERENCE)


def test_feature_width_mismatch_is_exit_3_at_the_cli(tmp_path, capsys):
    audio = tiny_audio_stage(tmp_path / "a.safetensors", features=torch.randn(49, 2, 16))
    ref = save_reference(tmp_path / "r.safetensors", tiny_reference_tensors())
    before = snapshot(tmp_path)
    one_line_error(*cli("render", "--audio", str(audio), "--ref", str(ref), "-o", str(tmp_path / "c.safetensors"), capsys=capsys),
                   3, "a.safetensors", "'features'", "2×32")
    assert snapshot(tmp_path) == before  # no .lock, no .parts/


def test_edited_fingerprint_is_refused(tmp_path):
    path = tiny_audio_stage(tmp_path / "a.safetensors", weights="0123456789abcdef")
    with pytest.raises(StageFileError, match="weights fingerprint"):
        stages.load_stage(path, stages.AUDIO)


def test_release_widths_are_the_model_defaults(tmp_path, monkeypatch):
    """The release's stage-file widths come from the model classes' defaults (the release's config, checked
    against the official manifest in test_models), or from an installed config.json."""
    from hallo3_cli.models import Hallo3Transformer3DModel

    monkeypatch.setenv("HALLO3_HOME", str(tmp_path))  # nothing installed
    defaults = {k: v.default for k, v in inspect.signature(Hallo3Transformer3DModel.__init__).parameters.items()}
    widths = network_widths(get_preset("hallo3"))
    assert widths["dit_layers"] == defaults["num_layers"] == 42
    assert widths["dit_width"] == defaults["num_attention_heads"] * defaults["attention_head_dim"]
    assert (widths["text_width"], widths["audio_layers"], widths["audio_width"], widths["patch"]) == (
        defaults["text_embed_dim"], defaults["audio_layers"], defaults["audio_channels"], defaults["patch_size"])


# ---------------------------------------------------------------------------------------------
# 4. batch jobs


def test_batch_names_cannot_collide_and_repeats_are_reported(tmp_path):
    from hallo3_cli.jobs import Job, read_jobs

    jobs_file = tmp_path / "jobs.txt"
    (tmp_path / "x").mkdir()
    lines = ["A@@face.png@@talk.wav", "A@@x/face.png@@x/talk.wav", "B@@face.png@@talk.wav", "A@@face.png@@talk.wav"]
    jobs_file.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode())  # with a BOM and CRLF
    jobs = read_jobs(jobs_file, tmp_path / "out", seed=1)
    real = [job for job in jobs if isinstance(job, Job)]
    assert len(real) == 3 and len({job.output for job in real}) == 3
    assert real[0].prompt == "A" and real[0].image == tmp_path / "face.png"  # the BOM is not part of the prompt
    assert all(re.fullmatch(r"face-talk-seed_1-[0-9a-f]{8}\.mp4", job.output.name) for job in real)
    (repeat,) = [job for job in jobs if isinstance(job, InputError)]
    assert "line 4" in str(repeat) and "line 1" in str(repeat)


def test_non_utf8_jobs_file_names_the_line(tmp_path):
    from hallo3_cli.jobs import read_jobs

    jobs_file = tmp_path / "jobs.txt"
    jobs_file.write_bytes("A@@f.png@@a.wav\nCaf\xe9@@f.png@@a.wav\n".encode("latin-1"))
    with pytest.raises(InputError, match="line 2: not UTF-8") as caught:
        read_jobs(jobs_file, tmp_path, seed=1)
    assert str(jobs_file) in str(caught.value)


# ---------------------------------------------------------------------------------------------
# 6. audio


def test_truncated_wav_is_refused(tmp_path, capsys):
    whole = write_wav(tmp_path / "whole.wav", seconds=2.0)
    cut = tmp_path / "cut.wav"
    cut.write_bytes(whole.read_bytes()[: 44 + 16000 * 2])  # the header still says 2 s
    one_line_error(*cli("embed-audio", str(cut), "-o", str(tmp_path / "a.safetensors"), "--model", "tiny-random", capsys=capsys),
                   3, "cut.wav", "truncated")
    assert not (tmp_path / "a.safetensors").exists()


# ---------------------------------------------------------------------------------------------
# 7. the README's xargs line, run exactly as written


def test_readme_xargs_line_runs_as_written(tmp_path):
    readme = (REPO / "README.md").read_text()
    (line,) = [line.strip() for line in readme.splitlines() if line.strip().startswith("ls speeches/*.wav | xargs")]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "hallo3"  # stands in for the heavy part: records its arguments
    # one write per call (xargs -P 2 runs two at once: piecewise writes would interleave)
    shim.write_text('#!/bin/sh\nline=""\nfor a in "$@"; do line="$line$a|"; done\nprintf "%s\\n" "$line" >> "$ARGV_LOG"\n')
    shim.chmod(0o755)
    (tmp_path / "speeches").mkdir()
    (tmp_path / "videos").mkdir()
    for name in ("one.wav", "two words.wav"):
        (tmp_path / "speeches" / name).write_bytes(b"")
    log = tmp_path / "argv.log"
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "ARGV_LOG": str(log)}
    result = subprocess.run(["sh", "-c", line], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    calls = sorted(log.read_text().splitlines())
    assert calls == [
        "render|me.jpg|speeches/one.wav|-o|videos/one.mp4|-q|",
        "render|me.jpg|speeches/two words.wav|-o|videos/two words.mp4|-q|",
    ]


# ---------------------------------------------------------------------------------------------
# 8. lock files


def test_job_lock_excludes_and_leaves_nothing(tmp_path):
    from hallo3_cli.jobs.common import job_lock

    lock = tmp_path / ".out.mp4.lock"
    inside, overlaps = [], []

    def worker():
        for _ in range(5):
            with job_lock(lock):
                if inside:
                    overlaps.append(1)
                inside.append(1)
                time.sleep(0.002)
                inside.pop()

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert overlaps == [] and not lock.exists()


def test_stage_timing_metadata_must_fit_the_preset(tmp_path):
    path = tiny_audio_stage(tmp_path / "a.safetensors", fps=30)
    with pytest.raises(StageFileError, match="metadata fps is 30, the tiny-random model uses 25"):
        stages.load_stage(path, stages.AUDIO)


def test_long_names_shorten_the_same_way_in_every_process(tmp_path, monkeypatch):
    out = tmp_path / ("v" * 240 + ".mp4")
    first = fsutil._temp_affixes(out)
    monkeypatch.setattr(os, "getpid", lambda: 4_000_000_000)  # a pid of another length
    second = fsutil._temp_affixes(out)
    assert first[0].rsplit(".", 2)[0] == second[0].rsplit(".", 2)[0] and len(second[0].encode()) + 8 + len(second[1]) <= 255


def test_bad_jobs_file_leaves_no_output_folder(tmp_path, capsys):
    jobs_file = tmp_path / "jobs.txt"
    jobs_file.write_bytes(b"Caf\xe9@@f.png@@a.wav\n")
    one_line_error(*cli("render", "--batch", str(jobs_file), "--out-dir", str(tmp_path / "videos"), "--model", "tiny-random",
                        capsys=capsys), 3, "jobs.txt", "line 1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["jobs.txt"]


def test_convert_and_download_destinations_are_checked(tmp_path):
    """convert/download write folders: an existing file, or a folder of the user's where ours would go, is
    refused before any work (exit 4), and a failed conversion leaves no destination behind."""
    import torch
    from safetensors.torch import save_file

    checkpoint = tmp_path / "x.safetensors"
    save_file({"a": torch.zeros(2)}, str(checkpoint))
    result = subprocess.run([sys.executable, "-m", "hallo3_cli", "convert", str(checkpoint), str(checkpoint)],
                            capture_output=True, text=True)
    assert result.returncode == 4 and "not a folder" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    mine = tmp_path / "d" / "transformer"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("mine")
    result = subprocess.run([sys.executable, "-m", "hallo3_cli", "convert", str(checkpoint), str(tmp_path / "d")],
                            capture_output=True, text=True)
    assert result.returncode == 4 and (mine / "notes.txt").read_text() == "mine" and sorted(mine.iterdir()) == [mine / "notes.txt"]
    result = subprocess.run([sys.executable, "-m", "hallo3_cli", "convert", str(checkpoint), str(tmp_path / "new")],
                            capture_output=True, text=True)
    assert result.returncode == 5 and not (tmp_path / "new").exists()  # no model keys: nothing left behind
    result = subprocess.run([sys.executable, "-m", "hallo3_cli", "download", "--dest", str(checkpoint), "--dry-run"],
                            capture_output=True, text=True)
    assert result.returncode == 4 and "not a folder" in result.stderr
