"""Never trust a path or a byte from outside (issue 18): hostile inputs built here in tmp dirs, one test per
class. Inputs are checked by content and kind before any decoder runs; decoding is bounded; every path a
command writes is checked before any work; numbers and structure of files are checked; the Python API names
the wrong argument; and the newcomer's list (help, unchanged renders, progress, eval offline).
Fast: the one render is marked slow."""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import wave
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_safety import cli  # hallo3 in this process: (exit code, stdout, stderr)

from hallo3_cli import fsutil, stages, store
from hallo3_cli.errors import ArgumentError, InputError, OutputError, StageFileError

REPO = Path(__file__).resolve().parents[1]
PRESETS = Path(__file__).with_name("presets_test.toml")


def one_line_error(code, out, err, expected_code, *words):
    assert code == expected_code, (code, err)
    assert out == "" and "Traceback" not in err
    errors = [line for line in err.strip().splitlines() if line.startswith("hallo3: ")]
    assert len(errors) == 1 and errors[0].startswith(("hallo3: error:", "hallo3: usage error:")), err
    for word in words:
        assert word in errors[0], (word, errors[0])


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else "other"
            for p in sorted(folder.rglob("*"))}


def write_wav(path: Path, seconds: float = 1.0, rate: int = 16000) -> Path:
    t = np.arange(int(seconds * rate))
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes((np.sin(t * 0.05) * 8000).astype("<i2").tobytes())
    return path


def write_float_wav(path: Path, samples: np.ndarray, rate: int = 16000) -> Path:
    """A mono IEEE-float (format 3) WAV: values outside [-1, 1] are legal in it."""
    data = samples.astype("<f4").tobytes()
    fmt = struct.pack("<HHIIHH", 3, 1, rate, rate * 4, 4, 32)
    path.write_bytes(b"RIFF" + struct.pack("<I", 4 + 8 + len(fmt) + 8 + len(data)) + b"WAVE"
                     + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data)
    return path


@contextmanager
def deadline(seconds: int):
    """Fail instead of hanging (a fifo read blocks forever)."""
    def expire(*_):
        raise AssertionError(f"still running after {seconds} s: something opened a fifo or device")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def media(tmp_path, monkeypatch):
    write_wav(tmp_path / "s.wav")
    Image.fromarray(np.full((96, 96, 3), 128, np.uint8)).save(tmp_path / "f.png")
    monkeypatch.chdir(tmp_path)
    return tmp_path


# ---------------------------------------------------------------------------------------------
# 2. inputs by content and kind, decoding bounded


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 100 100\n(pwned) print\nshowpage\n"


@pytest.mark.parametrize("content, words", [
    (EPS, ["PostScript/EPS", "not opened"]),
    (b"\xc5\xd0\xd3\xc6" + bytes(28) + EPS, ["EPS"]),
    (b"%PDF-1.7\n1 0 obj\n", ["PDF"]),
    (b"<svg xmlns='http://www.w3.org/2000/svg'/>", ["SVG"]),
    (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic", ["HEIC", "convert it"]),
    (b"P6\n100 100\n255\n" + bytes(30000), ["not one of the supported formats"]),  # PPM: PIL reads it, we do not
])
def test_only_documented_image_formats_are_opened(tmp_path, monkeypatch, content, words):
    from PIL import EpsImagePlugin

    from hallo3_cli.image_io import load_image

    def never(*_, **__):
        raise AssertionError("a non-documented decoder was reached")

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", never)
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", never)
    monkeypatch.setattr(subprocess, "Popen", never)  # nothing runs a program
    path = tmp_path / "face.jpg"  # the name lies: only the content counts
    path.write_bytes(content)
    with pytest.raises(InputError) as caught:
        load_image(path)
    message = str(caught.value)
    assert str(path) in message and "\n" not in message
    for word in words:
        assert word in message, (word, message)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF"])
def test_documented_formats_still_load(tmp_path, fmt):
    from hallo3_cli.image_io import load_image

    source = np.random.default_rng(1).integers(0, 255, (70, 90, 3), dtype=np.uint8)
    path = tmp_path / "face.bin"  # any name
    Image.fromarray(source).save(path, format=fmt)
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (90, 70)


def test_encode_ref_with_eps_is_exit_3_and_writes_nothing(media, capsys):
    (media / "face.jpg").write_bytes(EPS)
    before = snapshot(media)
    one_line_error(*cli("encode-ref", "face.jpg", "-o", "r.safetensors", "--model", "tiny-random",
                        "--preview", "p.png", capsys=capsys), 3, "face.jpg", "PostScript")
    assert snapshot(media) == before


def _png_header_only(path: Path, width: int, height: int, color_type: int = 2) -> None:
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


@pytest.mark.parametrize("fmt, size", [("PNG", (16384, 16384)), ("PNG", (9000, 8000)), ("PNG", (64, 2_000_000))])
def test_pixel_budget_refuses_what_cannot_be_reduced_before_decoding(tmp_path, monkeypatch, fmt, size):
    from PIL import ImageFile

    from hallo3_cli.image_io import MAX_DECODED_PIXELS, load_image

    def never(self, *_):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", never)
    path = tmp_path / "bomb.png"
    _png_header_only(path, *size)  # a few bytes that say gigabytes
    assert size[0] * size[1] > MAX_DECODED_PIXELS
    with pytest.raises(InputError, match="cannot be reduced while decoding") as caught:
        load_image(path)
    assert str(path) in str(caught.value) and "downscale" in str(caught.value)


_THIN = """
import json, resource, sys
from hallo3_cli.image_io import load_image, frame_image
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
image = load_image(sys.argv[1])
framed, framing = frame_image(image, 480, 720)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"shape": list(framed.shape), "growth_mb": (after - before) / 1024, "framing": framing}))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss is in KiB on Linux")
def test_thin_image_frames_in_bounded_memory(tmp_path):
    path = tmp_path / "thin.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (100000, 64, 3), dtype=np.uint8)).save(path)
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(_THIN), str(path)], capture_output=True, text=True,
                            check=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    report = json.loads(result.stdout)
    assert report["shape"] == [3, 480, 720] and report["framing"] == "crop"
    # the whole cover resize would be 720×1125000 float32 RGB: 9.7 GB
    assert report["growth_mb"] < 300, report


@pytest.mark.parametrize("src_w, src_h", [(64, 3000), (3000, 64), (100, 1500)])
def test_window_framing_matches_the_full_resize(src_w, src_h):
    from hallo3_cli.image_io import (
        MAX_COVER_FACTOR,
        _resize,
        frame_geometry,
        frame_image,
    )

    source = np.random.default_rng(src_w).integers(0, 255, (src_h, src_w, 3), dtype=np.uint8)
    g = frame_geometry(src_w, src_h, 480, 720)
    assert g.resized_width * g.resized_height > MAX_COVER_FACTOR * 480 * 720  # the window path
    framed, framing = frame_image(Image.fromarray(source), 480, 720)
    pixels = torch.from_numpy(source).permute(2, 0, 1).float() / 255
    full = _resize(pixels, (g.resized_height, g.resized_width), "bicubic")
    top, left = -g.offset_y, -g.offset_x
    expected = full[:, top:top + 480, left:left + 720] * 2 - 1
    assert framing == "crop" and framed.shape == (3, 480, 720)
    # torch computes its weights from float32 coordinates: at ~30000 output rows they are off by up to ~3e-4
    torch.testing.assert_close(framed, expected, atol=1e-3, rtol=0)
    # and exactly PIL's antialiased bicubic (the algorithm both implement)
    unit = source.astype(np.float32) / 255
    pil = np.stack([np.asarray(Image.fromarray(unit[..., c], mode="F").resize((g.resized_width, g.resized_height),
                                                                            Image.BICUBIC)) for c in range(3)])
    np.testing.assert_allclose(framed.numpy(), pil[:, top:top + 480, left:left + 720] * 2 - 1, atol=1e-5, rtol=0)


def _special_files(tmp_path: Path) -> dict[str, Path]:
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "link").symlink_to(tmp_path / "fifo")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "sock"))
    return {"fifo": tmp_path / "fifo", "link to a fifo": tmp_path / "link", "socket": tmp_path / "sock",
            "character device": Path("/dev/zero")}


def test_require_file_refuses_every_non_regular_file(tmp_path):
    for what, path in _special_files(tmp_path).items():
        with deadline(10), pytest.raises(InputError, match="not a regular file") as caught:
            fsutil.require_file(path)
        assert str(path) in str(caught.value), what
    with pytest.raises(InputError, match="directory"):
        fsutil.require_file(tmp_path)


@pytest.mark.parametrize("argv", [
    ["encode-ref", "fifo", "-o", "r.safetensors", "--model", "tiny-random"],
    ["embed-audio", "fifo", "-o", "a.safetensors", "--model", "tiny-random"],
    ["render", "fifo", "s.wav", "-o", "out.mp4", "--model", "tiny-random"],
    ["render", "f.png", "fifo", "-o", "out.mp4", "--model", "tiny-random"],
    ["render", "--audio", "fifo", "--ref", "fifo", "-o", "c.safetensors", "--model", "tiny-random"],
    ["render", "--batch", "fifo", "--out-dir", "videos", "--model", "tiny-random"],
    ["stitch", "fifo", "--audio", "s.wav", "-o", "out.mp4"],
    ["stitch", "fifo2", "--audio", "fifo", "-o", "out.mp4"],
    ["eval", "fifo", "--model", "tiny-random"],
    ["convert", "fifo", "dest"],
], ids=lambda argv: " ".join(argv[:2]))
def test_fifo_inputs_are_refused_before_opening(media, capsys, argv):
    os.mkfifo(media / "fifo")
    (media / "fifo2").symlink_to(media / "fifo")
    before = snapshot(media)
    with deadline(60):
        one_line_error(*cli(*argv, capsys=capsys), 3, "fifo", "not a regular file")
    assert snapshot(media) == before


# ---------------------------------------------------------------------------------------------
# 4. every path a command writes, checked before any work


@pytest.mark.parametrize("argv, prepare, words", [
    (["render", "f.png", "s.wav", "-o", "out.mp4", "--eval"], lambda m: (m / "out.eval.json").mkdir(),
     ["out.eval.json", "directory"]),
    (["render", "f.png", "s.wav", "-o", "out.mp4", "--eval"], lambda m: os.mkfifo(m / "out.eval.json"),
     ["out.eval.json", "fifo"]),
    (["render", "f.png", "s.wav", "-o", "out.mp4", "--cache-dir", "out.mp4"], None, ["out.mp4", "output"]),
    (["render", "f.png", "s.wav", "-o", "out.mp4", "--cache-dir", "out.mp4/cache"], None, ["output"]),
    (["render", "f.png", "s.wav", "-o", "out.mp4", "--cache-dir", "f.png"], None, ["f.png", "not a folder"]),
    (["render", "f.png", "s.wav", "-o", "x" * 252 + ".mp4"], None, ["256 bytes", "file system"]),
    (["render", "f.png", "s.wav", "-o", "out.mp4", "--cache-dir", "c/" + "d" * 300], None, ["300 bytes"]),
    (["render", "--audio", "a.safetensors", "--ref", "r.safetensors", "-o", "c.safetensors"],
     lambda m: (m / "c.safetensors.parts").write_text("in the way"), ["c.safetensors.parts", "not a folder"]),
    (["render", "--audio", "a.safetensors", "--ref", "r.safetensors", "-o", "c.safetensors"],
     lambda m: (m / ".c.safetensors.lock").mkdir(), [".c.safetensors.lock", "directory"]),
    (["render", "--batch", "jobs.txt", "--out-dir", "videos", "--cache-dir", "jobs.txt"], None, ["jobs.txt", "not a folder"]),
    (["embed-audio", "s.wav", "-o", os.fsdecode(b"caf\xe9.safetensors")], None, ["not valid UTF-8", "caf\\xe9"]),
    (["encode-ref", "f.png", "-o", "r.safetensors", "--preview", os.fsdecode(b"\xff.png")], None, ["not valid UTF-8"]),
], ids=["eval-dir", "eval-fifo", "cache=out", "cache-in-out", "cache=input", "long-name", "long-cache", "parts-file",
        "lock-dir", "batch-cache=input", "non-utf8", "non-utf8-preview"])
def test_side_paths_are_checked_before_any_work(media, capsys, argv, prepare, words):
    (media / "a.safetensors").write_bytes(b"stand-in: the checks come first")
    (media / "r.safetensors").write_bytes(b"stand-in")
    (media / "jobs.txt").write_text("p@@f.png@@s.wav\n")
    if prepare is not None:
        prepare(media)
    before = snapshot(media)
    one_line_error(*cli(*argv, *(["--model", "tiny-random"] if argv[0] != "stitch" else []), capsys=capsys), 4, *words)
    assert snapshot(media) == before  # no cache, no render, nothing written


def test_long_output_names_keep_side_paths_within_the_limit(tmp_path):
    from hallo3_cli.jobs.commands import clips_side_paths

    output = tmp_path / ("n" * 240 + ".safetensors")  # 252 bytes: fine itself, + ".parts" would not be
    fsutil.check_output_path(output)
    parts, lock = clips_side_paths(output)
    for path in (parts, lock):
        assert len(path.name.encode()) <= 255 and path.parent == tmp_path
    assert parts.name.endswith(".parts") and lock.name.startswith(".") and lock.name.endswith(".lock")
    assert clips_side_paths(output) == (parts, lock)  # every process derives the same names
    short = tmp_path / "c.safetensors"
    assert clips_side_paths(short) == (tmp_path / "c.safetensors.parts", tmp_path / ".c.safetensors.lock")
    fsutil.check_output_folder(parts, outputs=[output])
    fsutil.check_output_path(lock)


@contextmanager
def file_size_limit(limit: int):
    """Writes past ``limit`` bytes fail with EFBIG, like a full disk (Python ignores SIGXFSZ)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def test_a_full_disk_during_any_write_is_exit_4_and_leaves_nothing(tmp_path):
    from hallo3_cli.video_io import VideoWriter

    tensors = {"features": torch.randn(2000, 2, 64)}
    meta = {"model": "tiny-random", "weights": "w", "params": {}, "source_sha256": "0" * 64, "fps": 25,
            "num_frames": 1990, "clip_length": 49, "sample_rate": 16000}
    with file_size_limit(64 << 10), pytest.raises(OutputError, match="file too large|no space") as caught:
        stages.save_stage(tmp_path / "a.safetensors", stages.AUDIO, tensors, meta)  # 1 MB: past the limit
    assert caught.value.exit_code == 4 and "nothing was written" in str(caught.value)
    assert list(tmp_path.iterdir()) == []
    frames = np.random.default_rng(0).integers(0, 255, (50, 64, 96, 3), dtype=np.uint8)  # noise: no compression
    with file_size_limit(32 << 10), pytest.raises(OutputError) as caught:
        with VideoWriter(tmp_path / "v.mp4", 96, 64) as writer:
            writer.write(frames)
    assert caught.value.exit_code == 4
    assert list(tmp_path.iterdir()) == []
    assert fsutil.disk_full(OSError(28, "No space left on device")) == "no space left on the device"
    assert fsutil.disk_full(RuntimeError("IoError(Os { code: 28, kind: StorageFull })")) is not None
    assert fsutil.disk_full(ValueError("bad value")) is None


def test_a_full_disk_at_the_cli_is_one_line_exit_4(media):
    """The whole command, as a user meets it: ``embed-audio`` whose stage file does not fit."""
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    write_wav(media / "long.wav", seconds=6.0)
    result = subprocess.run([sys.executable, "-m", "hallo3_cli", "embed-audio", "long.wav", "-o", "a.safetensors",
                             "--model", "tiny-random", "-q"], capture_output=True, text=True, cwd=media, preexec_fn=limit,
                            env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"}, timeout=300)
    assert result.returncode == 4, result.stderr[-2000:]
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("hallo3: error:") and "a.safetensors" in line and "nothing was written" in line
    assert sorted(p.name for p in media.iterdir()) == ["f.png", "long.wav", "s.wav"]


# ---------------------------------------------------------------------------------------------
# 5. numbers and structure


def test_audio_that_normalises_to_non_finite_values_is_refused(tmp_path, capsys):
    from hallo3_cli.audio_io import check_waveform, load_audio

    t = np.arange(16000)
    loud = write_float_wav(tmp_path / "loud.wav", np.sin(t * 0.05) * 1e30)
    with pytest.raises(InputError, match="too large to normalise") as caught:
        load_audio(loud)
    assert str(loud) in str(caught.value)
    with pytest.raises(ArgumentError, match="audio holds samples up to"):
        check_waveform((np.sin(t * 0.05) * 1e25).astype(np.float32))
    one_line_error(*cli("embed-audio", str(loud), "-o", str(tmp_path / "a.safetensors"), "--model", "tiny-random",
                        capsys=capsys), 3, "loud.wav", "normalise")
    assert not (tmp_path / "a.safetensors").exists()
    # a float recording slightly past full scale is fine
    assert np.isfinite(load_audio(write_float_wav(tmp_path / "hot.wav", np.sin(t * 0.05) * 1.5))).all()


def _clips_file(path: Path, num_frames: int, clips: int, **overrides) -> Path:
    from safetensors.torch import save_file

    meta = {"format": "hallo3.clips", "format_version": "1", "model": "tiny-random", "weights": "w", "params": "{}",
            "source_sha256": "0" * 64, "num_frames": str(num_frames), "fps": "25", "clip_length": "49",
            "motion_frames": "2", "framing": "crop", "height": "16", "width": "24"}
    meta.update({k: str(v) for k, v in overrides.items()})
    save_file({"latents": torch.zeros(clips, 13, 16, 2, 3)}, str(path), metadata=meta)
    return path


@pytest.mark.parametrize("num_frames, clips, words", [
    (-5, 1, ["at least 1"]), (0, 1, ["at least 1"]), (95, 2, ["exceeds"]), (40, 2, ["holds 2 clips", "makes 1"]),
])
def test_clips_metadata_must_describe_its_tensors(tmp_path, num_frames, clips, words):
    path = _clips_file(tmp_path / "c.safetensors", num_frames, clips)
    with pytest.raises(StageFileError) as caught:
        stages.load_stage(path, stages.CLIPS, geometry=False)
    assert all(word in str(caught.value) for word in words), str(caught.value)
    path = _clips_file(tmp_path / "m.safetensors", 40, 1, motion_frames=49)
    with pytest.raises(StageFileError, match="motion_frames"):
        stages.load_stage(path, stages.CLIPS, geometry=False)
    stages.load_stage(_clips_file(tmp_path / "ok.safetensors", 94, 2), stages.CLIPS, geometry=False)


def test_stitch_refuses_a_negative_frame_count(media, capsys):
    _clips_file(media / "c.safetensors", -5, 1)
    one_line_error(*cli("stitch", "c.safetensors", "--audio", "s.wav", "-o", "out.mp4", capsys=capsys), 3,
                   "c.safetensors", "num_frames")
    assert not (media / "out.mp4").exists()


def test_deeply_nested_metadata_is_exit_3_not_a_recursion_error(media, capsys):
    from safetensors.torch import save_file

    deep = "[" * 200_000 + "]" * 200_000
    path = _clips_file(media / "c.safetensors", 40, 1, params='{"a": ' + deep + "}")
    with pytest.raises(StageFileError, match="nested more than"):
        stages.load_stage(path, stages.CLIPS)
    one_line_error(*cli("stitch", "c.safetensors", "--audio", "s.wav", "-o", "out.mp4", capsys=capsys), 3,
                   "c.safetensors", "nested")
    raw = media / "raw.safetensors"  # the header itself nested
    header = ('{"__metadata__": {"format": "hallo3.clips"}, "x": ' + "[" * 100_000 + "]" * 100_000 + "}").encode()
    raw.write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(StageFileError, match="nested more than"):
        stages.load_stage(raw, stages.CLIPS)
    with pytest.raises(ValueError, match="longer|bytes long"):
        store.parse_json(b"[]" * 10, max_bytes=8)
    save_file({"x": torch.zeros(1)}, str(media / "fine.safetensors"), metadata={"k": '"[[[[\\"'})  # brackets in strings
    assert store.read_safetensors_header(media / "fine.safetensors")["__metadata__"]["k"] == '"[[[[\\"'


def test_non_utf8_stage_paths_are_read(tmp_path):
    name = tmp_path / os.fsdecode(b"caf\xe9.safetensors")
    from safetensors.torch import save_file

    meta = {"format": "hallo3.clips", "format_version": "1", "model": "tiny-random", "weights": "w", "params": "{}",
            "source_sha256": "0" * 64, "num_frames": "40", "fps": "25", "clip_length": "49", "motion_frames": "2",
            "framing": "crop", "height": "16", "width": "24"}
    save_file({"latents": torch.ones(1, 13, 16, 2, 3)}, str(tmp_path / "plain.safetensors"), metadata=meta)
    os.rename(tmp_path / "plain.safetensors", name)
    stage = stages.load_stage(name, stages.CLIPS, geometry=False)
    assert float(stage["latents"].sum()) == 13 * 16 * 6


def test_jobs_files_split_on_newlines_only(tmp_path):
    from hallo3_cli.jobs import Job, read_jobs

    jobs_file = tmp_path / "jobs.txt"
    prompts = ["a beach\u2028at dusk", "a room\x0cwith a lamp", "next\x1cline\x85sep", "plain"]
    jobs_file.write_bytes("\r\n".join(f"{p}@@f.png@@s.wav" for p in prompts).encode() + b"\n")
    jobs = read_jobs(jobs_file, tmp_path / "out", seed=1)
    assert [job.prompt for job in jobs] == prompts and all(isinstance(job, Job) for job in jobs)


def test_batch_outputs_that_are_not_files_are_refused_not_listed(tmp_path, caplog):
    from hallo3_cli.jobs import Job, read_jobs, render_batch

    write_wav(tmp_path / "s.wav")
    Image.fromarray(np.full((96, 96, 3), 128, np.uint8)).save(tmp_path / "f.png")
    jobs_file = tmp_path / "jobs.txt"
    jobs_file.write_text("p@@f.png@@s.wav\nq@@f.png@@s.wav\n")
    out = tmp_path / "out"
    first, second = [job for job in read_jobs(jobs_file, out, seed=1) if isinstance(job, Job)]
    first.output.mkdir(parents=True)  # a folder by the name of the video
    second.output.write_bytes(b"a finished video")  # a regular file: skipped as done
    written, errors = render_batch(jobs_file, out, model="tiny-random", seed=1, progress=False)
    assert written == [second.output]
    (error,) = errors
    assert first.output.name in error and "directory" in error


def test_plan_ranges_and_strict_json(capsys):
    one_line_error(*cli("plan", "--model", "tiny-random", "--height", "8192", capsys=capsys), 2, "larger", "128")
    one_line_error(*cli("plan", "--height", "8192", capsys=capsys), 2, "480")  # the release: 480×720 at most
    one_line_error(*cli("plan", "--model", "tiny-random", "--gpus", "2", "--interconnect", "1e300", capsys=capsys), 2,
                   "bandwidth")
    from hallo3_cli.errors import UsageError
    from hallo3_cli.plan import _strict

    with pytest.raises(UsageError):
        from hallo3_cli.plan import plan

        plan("tiny-random", height=4096, width=4096)
    assert json.loads(json.dumps(_strict({"a": float("inf"), "b": [float("nan"), 1.5], "c": (2,)}), allow_nan=False)) \
        == {"a": None, "b": [None, 1.5], "c": [2]}


def _vfr_video(path: Path, times_ms: list[int]) -> None:
    """Frames of distinct grey levels at ``times_ms`` (a millisecond time base), the last shown 40 ms."""
    import av

    with av.open(str(path), "w", format="matroska") as container:
        stream = container.add_stream("ffv1", rate=25)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        for index, ms in enumerate(times_ms):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 10 * index, np.uint8), format="rgb24")
            frame.pts, frame.time_base = ms, Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        container.mux(stream.encode(None))


def test_variable_frame_rate_videos_are_resampled(tmp_path):
    from hallo3_cli.evaluate.frames import iter_frames

    # 10 frames over 400 ms: an average of 25 fps, but bunched (three in the first 40 ms, one held 120 ms)
    times = [0, 10, 20, 40, 160, 200, 240, 280, 320, 360]
    _vfr_video(tmp_path / "vfr.mkv", times)
    levels = [int(round(frame[..., 0].mean() / 10)) for frame in iter_frames(tmp_path / "vfr.mkv")]
    # at each k/25 s the frame on screen: 0 ms → #0, 40 → #3, 80 → #3, 120 → #3, 160 → #4, ...
    assert levels == [0, 3, 3, 3, 4, 5, 6, 7, 8, 9], levels
    _vfr_video(tmp_path / "cfr.mkv", [40 * i for i in range(8)])  # constant 25 fps: frame for frame
    assert [int(round(f[..., 0].mean() / 10)) for f in iter_frames(tmp_path / "cfr.mkv")] == list(range(8))


# ---------------------------------------------------------------------------------------------
# 6. the Python API names the wrong argument


def test_jobs_api_names_the_wrong_argument(media):
    from hallo3_cli.jobs import (
        embed_audio,
        encode_reference,
        render_batch,
        render_clips,
        render_video,
        stitch,
    )

    cases = [
        (lambda: render_video(None, "s.wav", "o.mp4", model="tiny-random"), ValueError, "image is required"),
        (lambda: render_video(3, "s.wav", "o.mp4", model="tiny-random"), TypeError, "image must be a file path"),
        (lambda: render_video("f.png", "s.wav", None, model="tiny-random"), ValueError, "output is required"),
        (lambda: render_video("f.png", "s.wav", "o.mp4", model=None), TypeError, "model must be"),
        (lambda: render_video("f.png", "s.wav", "o.mp4", model="nope"), ValueError, "model: unknown model preset"),
        (lambda: render_video("f.png", "s.wav", "o.mp4", model="tiny-random", seed="7"), TypeError, "seed must be an int"),
        (lambda: render_video("f.png", "s.wav", "o.mp4", model="tiny-random", steps=0), ValueError, "steps must be"),
        (lambda: render_video("f.png", "s.wav", "o.mp4", model="tiny-random", cfg=float("nan")), ValueError, "cfg must be"),
        (lambda: render_video("f.png", "s.wav", "o.mp4", model="tiny-random", prompt=5), TypeError, "prompt must be"),
        (lambda: render_video("f.png", "s.wav", "o.mp4", model="tiny-random", cache_dir=1), TypeError, "cache_dir must be"),
        (lambda: render_video("f.png", "s.wav", "o.mp4", model="tiny-random", runtime="cpu"), TypeError, "runtime must be"),
        (lambda: embed_audio(None, "a.safetensors", model="tiny-random"), ValueError, "speech is required"),
        (lambda: embed_audio("s.wav", "", model="tiny-random"), ValueError, "output is an empty path"),
        (lambda: embed_audio("s.wav", "a.safetensors", model="tiny-random", separate_vocals="yes"), TypeError,
         "separate_vocals must be True or False"),
        (lambda: encode_reference("f.png", "r.safetensors", model="tiny-random", preview=5), TypeError, "preview must be"),
        (lambda: encode_reference("f.png", "r.safetensors", model="tiny-random", prompt=["a"]), TypeError, "prompt must be"),
        (lambda: render_clips(None, "r.safetensors", "c.safetensors"), ValueError, "audio is required"),
        (lambda: render_clips("a.safetensors", "r.safetensors", "c.safetensors", steps=2.5), ValueError, "steps must be"),
        (lambda: stitch("c.safetensors", "o.mp4", audio=None), ValueError, "audio is required"),
        (lambda: render_batch(None, "out"), ValueError, "jobs_file is required"),
        (lambda: render_batch("jobs.txt", "out", seed=1.5), TypeError, "seed must be an int"),
    ]
    for call, error, words in cases:
        with pytest.raises(error, match=words):
            call()
    assert sorted(p.name for p in media.iterdir()) == ["f.png", "s.wav"]  # nothing done


def test_pipeline_call_checks_its_media_before_any_work(monkeypatch):
    from hallo3_cli.loading import PipelineLoader
    from hallo3_cli.presets import get_preset

    pipe = PipelineLoader(get_preset("tiny-random")).pipe  # no network loaded
    monkeypatch.setattr(type(pipe), "encode_audio", lambda *a, **k: (_ for _ in ()).throw(AssertionError("work")))
    cases = [
        (dict(image=None, audio=np.zeros(16000, np.float32)), ValueError, "image is required"),
        (dict(image=np.zeros((100, 100, 3), np.uint8), audio=None), ValueError, "audio is required"),
        (dict(image=np.zeros((10, 10, 3), np.uint8), audio=np.ones(16000, np.float32)), ValueError, "image is too small"),
        (dict(image=np.full((100, 100, 3), 2.0), audio=np.ones(16000, np.float32)), ValueError, "in \\[0, 1\\]"),
        (dict(image=torch.zeros(3, 100, 100), audio=np.ones(16000, np.float32)), TypeError, "image must be"),
        (dict(image=np.zeros((100, 100, 3), np.uint8), audio=np.ones((2, 16000), np.float32)), ValueError, "audio must be 1-D"),
        (dict(image=np.zeros((100, 100, 3), np.uint8), audio=[0.0] * 16000), TypeError, "audio must be"),
        (dict(image="missing.png", audio=np.ones(16000, np.float32)), InputError, "missing.png: no such file"),
    ]
    for kwargs, error, words in cases:
        with pytest.raises(error, match=words):
            pipe(**kwargs)
    from hallo3_cli.image_io import rgb_array

    grey = rgb_array(np.full((80, 80, 3), 0.5, np.float32))  # float [0, 1] images are accepted, not black
    assert grey.dtype == np.uint8 and (grey == 128).all()


# ---------------------------------------------------------------------------------------------
# 7. the newcomer's list


def test_hallo3_alone_prints_the_help(capsys):
    code, out, err = cli(capsys=capsys)
    assert code == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines[0].startswith("Usage: hallo3") and len(lines) > 10  # the help as --help shows it, not one line
    assert any(line.strip().startswith("render") for line in lines)


def test_progress_says_what_it_does_and_its_eta_ignores_loading(monkeypatch, capsys):
    from hallo3_cli import progress

    clock = [100.0]
    monkeypatch.setattr(progress.time, "perf_counter", lambda: clock[0])
    bar = progress.Progress(True, clips=6, steps=4, done=2, decode_resumed=True)
    clock[0] += 500  # loading the networks and decoding the resumed clips: not rendering time
    bar.resumed_clip(0)
    bar.resumed_clip(1)
    bar.start_clip(None, 2, 6)
    clock[0] += 10
    bar.finish_clip()
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0] == "hallo3: resuming after 2/6 finished clips (decoding them into the video first)"
    assert lines[-3] == "hallo3: decoded finished clip 2/2" and "rendering clip 3/6" in lines[-2]
    assert lines[-1] == "hallo3: clip 3/6 done (10 s rendering so far, ETA 30 s)"  # 3 clips left × 10 s
    bar.start_clip(None, 3, 6)
    clock[0] += progress.LOG_EVERY + 1  # a long clip: a line about it, not minutes of silence
    for _ in range(4):
        bar.step()
    said = capsys.readouterr().err
    assert "clip 4/6: step 1/4 done" in said


def test_eval_offline_names_exactly_what_it_needs(tmp_path, monkeypatch, capsys):
    from hallo3_cli.video_io import VideoWriter

    video = tmp_path / "tiny.mp4"
    write_wav(tmp_path / "s.wav", seconds=1.0)
    with VideoWriter(video, 96, 64, audio=tmp_path / "s.wav", tag={"model": "tiny-random", "render_key": "k"}) as writer:
        writer.write(np.zeros((25, 64, 96, 3), np.uint8))
    monkeypatch.setenv("HALLO3_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    code, out, err = cli("eval", str(video), capsys=capsys)
    one_line_error(code, out, err, 5, "face_analysis, syncnet", "332.2 MB",
                   "hallo3 download --model hallo3 --component face_analysis --component syncnet",
                   "rendered with --model tiny-random", f"hallo3 eval {video} --model tiny-random")
    assert "40" not in err.split("332.2 MB")[0][-12:]  # not the whole release
    assert not (tmp_path / "home").exists() or not any((tmp_path / "home").rglob("*.onnx"))


@pytest.mark.slow
def test_an_unchanged_finished_render_is_not_decoded_or_rewritten(media, monkeypatch):
    from hallo3_cli.jobs import render_video
    from hallo3_cli.pipeline_hallo3 import Hallo3Pipeline

    monkeypatch.setenv("HALLO3_PRESETS", str(PRESETS))
    out = render_video("f.png", "s.wav", "out.mp4", model="tiny-test", seed=1, progress=False)
    stamp = out.stat().st_mtime_ns
    records = list((media / ".hallo3-cache").glob("*.video.json"))
    assert len(records) == 1 and json.loads(records[0].read_text())["sha256"] == fsutil.sha256_file(out)

    def no_decode(*_):
        raise AssertionError("decoded again")

    monkeypatch.setattr(Hallo3Pipeline, "decode_latents", no_decode)
    assert render_video("f.png", "s.wav", "out.mp4", model="tiny-test", seed=1, progress=False) == out
    assert out.stat().st_mtime_ns == stamp
    out.write_bytes(out.read_bytes()[:-10])  # the video changed since: it is rendered (decoded) again
    with pytest.raises(AssertionError, match="decoded again"):
        render_video("f.png", "s.wav", "out.mp4", model="tiny-test", seed=1, progress=False)
