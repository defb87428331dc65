"""The ``hallo3`` command-line contract, run as a subprocess: help, version, exit codes, stdout/stderr, errors."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
import tomllib
import wave
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest

import hallo3_cli
from hallo3_cli import errors

REPO = Path(__file__).resolve().parents[1]
COMMANDS = ["download", "convert", "embed-audio", "encode-ref", "render", "stitch", "prepare", "train"]
HEAVY = ["torch", "numpy", "diffusers", "transformers", "av", "safetensors", "onnxruntime", "PIL"]


def _command(args, env):
    environment = {k: v for k, v in os.environ.items() if k != "HALLO3_DEBUG"}
    environment.update(env or {})
    return [sys.executable, "-m", "hallo3_cli", *args], environment


def run(*args: str, cwd: Path, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    command, environment = _command(args, env)
    return subprocess.run(command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=timeout)


def run_together(*calls: tuple[list[str], dict | None], cwd: Path, timeout: float = 600) -> list[subprocess.CompletedProcess]:
    """Several independent ``hallo3`` runs at once (each pays the interpreter and import start-up)."""
    processes = []
    for args, env in calls:
        command, environment = _command(args, env)
        processes.append(
            (command, subprocess.Popen(command, cwd=cwd, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        )
    results = []
    for command, process in processes:
        stdout, stderr = process.communicate(timeout=timeout)
        results.append(subprocess.CompletedProcess(command, process.returncode, stdout, stderr))
    return results


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str, code: int | None = None) -> str:
    """A failed command: non-zero exit, nothing on stdout, one ``hallo3: error:`` line on stderr, no traceback."""
    assert result.returncode != 0, result
    if code is not None:
        assert result.returncode == code, (result.returncode, result.stderr)
    assert result.stdout == ""
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("hallo3: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def write_speech_wav(path: Path, seconds: float = 1.5, rate: int = 16000) -> None:
    """Speech-like mono 16-bit wav: a gliding harmonic voice, amplitude-modulated by smoothed noise."""
    rng = np.random.default_rng(3)
    t = np.arange(int(seconds * rate)) / rate
    pitch = 130 + 30 * np.sin(2 * np.pi * 2.5 * t)
    phase = 2 * np.pi * np.cumsum(pitch) / rate
    voice = sum(np.sin(k * phase) / k for k in range(1, 12))
    syllables = np.convolve(np.abs(rng.standard_normal(t.size)), np.ones(1200) / 1200, mode="same")
    signal = voice * syllables / syllables.max() + 0.02 * rng.standard_normal(t.size)
    data = np.round(0.6 * signal / np.abs(signal).max() * 32767).astype("<i2")
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes(data.tobytes())


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("media") / "speech.wav"
    write_speech_wav(path)
    return path


# ---------------------------------------------------------------------------------------------
# help, version, entry points (no heavy imports)

PROBE = textwrap.dedent(
    """
    import contextlib, io, json, sys
    from hallo3_cli.cli import main
    heavy = {heavy!r}
    results = []
    for argv in {argvs!r}:
        out, err = io.StringIO(), io.StringIO()
        sys.argv = ["hallo3", *argv]
        code = 0
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main()
            except SystemExit as exit:
                code = exit.code or 0
        imported = sorted(m for m in sys.modules if m.split(".")[0] in heavy)
        results.append(dict(argv=argv, code=code, stdout=out.getvalue(), stderr=err.getvalue(), heavy=imported))
    print(json.dumps(results))
    """
)


@pytest.fixture(scope="module")
def help_pages(tmp_path_factory) -> dict[str, dict]:
    """``--help``/``--version`` of the app and every command, all run in one fresh interpreter.

    ``heavy`` lists the heavy modules imported so far: they accumulate, so the first page that
    shows one is the culprit.
    """
    argvs = [["--help"], ["--version"], ["-h"]] + [[command, "--help"] for command in COMMANDS]
    code = PROBE.format(heavy=HEAVY, argvs=argvs)
    env = {k: v for k, v in os.environ.items() if k != "HALLO3_DEBUG"}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path_factory.mktemp("probe"), env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return {" ".join(page["argv"]): page for page in json.loads(result.stdout)}


def test_help_and_version_import_nothing_heavy(help_pages):
    for name, page in help_pages.items():
        assert page["heavy"] == [], f"'hallo3 {name}' imported {page['heavy']}"


def test_main_help_lists_every_command_with_one_line(help_pages):
    page = help_pages["--help"]
    assert page["code"] == 0 and page["stderr"] == ""
    text = page["stdout"]
    assert text == help_pages["-h"]["stdout"]
    assert "Usage: hallo3" in text
    lines = text.split("Commands:", 1)[1].splitlines()
    for command in COMMANDS:
        rows = [line.split(None, 1) for line in lines if line.split(None, 1)[:1] == [command]]
        assert len(rows) == 1, f"{command} is not listed once under Commands:\n{text}"
        assert len(rows[0]) == 2 and len(rows[0][1]) > 10, f"{command} has no one-line help"


@pytest.mark.parametrize("command", COMMANDS)
def test_command_help_has_an_example(help_pages, command):
    page = help_pages[f"{command} --help"]
    assert page["code"] == 0 and page["stderr"] == ""
    assert page["stdout"].startswith(f"Usage: hallo3 {command} ")
    assert "Example" in page["stdout"]
    assert f"hallo3 {command} " in page["stdout"].split("Example", 1)[1]


def test_render_examples_keep_their_lines(help_pages):
    lines = [line.strip() for line in help_pages["render --help"]["stdout"].splitlines()]
    assert "hallo3 render face.png speech.wav -o out.mp4" in lines
    assert "hallo3 render --batch jobs.txt --out-dir videos/" in lines


def test_version(help_pages, tmp_path):
    page = help_pages["--version"]
    assert page["code"] == 0
    assert page["stdout"].strip() == f"hallo3-cli {hallo3_cli.__version__}"
    result = run("--version", cwd=tmp_path)  # the real `python -m hallo3_cli`
    assert result.returncode == 0 and result.stdout.strip() == f"hallo3-cli {hallo3_cli.__version__}"
    assert metadata.version("hallo3-cli") == hallo3_cli.__version__


def test_console_script_entry_point():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["hallo3"] == "hallo3_cli.cli:main"
    installed = metadata.entry_points(group="console_scripts", name="hallo3")
    assert [entry.value for entry in installed] == ["hallo3_cli.cli:main"]
    assert callable(next(iter(installed)).load())


# ---------------------------------------------------------------------------------------------
# usage errors and unimplemented commands


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["frob"], "No such command"),
        (["--frob"], "No such option"),
        (["embed-audio"], "Missing argument"),
        (["embed-audio", "speech.wav"], "Missing option"),
        (["render", "--steps", "many", "-o", "x.mp4"], "--steps"),
        (["render", "--steps", "0", "-o", "x.mp4"], "--steps"),
        (["embed-audio", "speech.wav", "-o", "x.safetensors", "--debug"], "No such option"),
    ],
)
def test_usage_errors_exit_2(tmp_path, argv, needle):
    result = run(*argv, cwd=tmp_path)
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hallo3: usage error: ") and needle in lines[0], result.stderr
    assert "--help" in lines[0]
    assert list(tmp_path.iterdir()) == []


def test_no_arguments_shows_help(tmp_path):
    result = run(cwd=tmp_path)
    assert "Traceback" not in result.stdout + result.stderr
    assert "embed-audio" in result.stdout + result.stderr


def test_download_dry_run_and_missing_weights(tmp_path):
    import os

    env = {**os.environ, "HALLO3_HOME": str(tmp_path / "home")}
    result = subprocess.run([sys.executable, "-m", "hallo3_cli", "download", "--dry-run"], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert "total" in result.stdout.lower() and "GB" in result.stdout
    assert not (tmp_path / "home").exists()  # a dry run writes nothing
    # Without weights and with --no-download, render names the exact command and loads nothing.
    (tmp_path / "face.png").write_bytes(b"x")
    (tmp_path / "speech.wav").write_bytes(b"x")
    result = subprocess.run(
        [sys.executable, "-m", "hallo3_cli", "render", "face.png", "speech.wav", "-o", str(tmp_path / "o.mp4"), "--no-download"],
        capture_output=True, text=True, env=env, cwd=tmp_path,
    )
    assert result.returncode == errors.ModelError.exit_code
    assert "hallo3 download --model hallo3" in result.stderr and "Traceback" not in result.stderr


# ---------------------------------------------------------------------------------------------
# user errors: one line naming the file, no traceback, no output left behind


def test_embed_audio_errors(tmp_path, speech):
    (tmp_path / "notes.wav").write_text("not audio at all\n" * 10)
    (tmp_path / "speech.wav").write_bytes(speech.read_bytes())
    before = sorted(p.name for p in tmp_path.iterdir())
    tiny = ("--model", "tiny-random")

    folder = tmp_path / "folder.wav"
    folder.mkdir()
    missing, text, nowhere, directory = run_together(
        (["embed-audio", "missing.wav", "-o", "a.safetensors", *tiny], None),
        (["embed-audio", "notes.wav", "-o", "b.safetensors", *tiny], None),
        (["embed-audio", "speech.wav", "-o", "nowhere/c.safetensors", *tiny], None),
        (["embed-audio", "folder.wav", "-o", "d.safetensors", *tiny], None),
        cwd=tmp_path,
    )
    folder.rmdir()
    assert_one_line_error(missing, "missing.wav", "no such file", code=errors.InputError.exit_code)
    assert_one_line_error(text, "notes.wav", code=errors.InputError.exit_code)
    assert_one_line_error(nowhere, "nowhere/c.safetensors", "does not exist", code=errors.OutputError.exit_code)
    assert_one_line_error(directory, "folder.wav", "directory", code=errors.InputError.exit_code)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output, no temp file


def test_debug_shows_the_traceback(tmp_path):
    argv = ["embed-audio", "missing.wav", "-o", "a.safetensors", "--model", "tiny-random"]
    for result in run_together((["--debug", *argv], None), (argv, {"HALLO3_DEBUG": "1"}), cwd=tmp_path):
        assert result.returncode != 0
        assert "Traceback (most recent call last)" in result.stderr
        assert "InputError: missing.wav: no such file" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_stitch_truncated_clips_file(tmp_path, speech):
    import torch

    from hallo3_cli import stages

    clips = tmp_path / "clips.safetensors"
    meta = dict(
        model="tiny-random", weights="w", params={}, source_sha256="0" * 64,
        num_frames=40, fps=25, clip_length=49, motion_frames=2, framing="pad", height=16, width=24,
    )
    stages.save_stage(clips, stages.CLIPS, {"latents": torch.zeros(1, 13, 16, 2, 3)}, meta)
    blob = clips.read_bytes()
    clips.write_bytes(blob[: len(blob) * 2 // 3])
    result = run("stitch", "clips.safetensors", "--audio", str(speech), "-o", "out.mp4", cwd=tmp_path)
    assert_one_line_error(result, "clips.safetensors", "truncated", code=errors.InputError.exit_code)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clips.safetensors"]


# ---------------------------------------------------------------------------------------------
# success: the result path alone on stdout


def test_embed_audio_stdout_is_the_result_path(tmp_path, speech):
    from hallo3_cli import stages

    tiny = ["--model", "tiny-random", "--device", "cpu"]
    result, quiet = run_together(
        (["embed-audio", str(speech), "-o", "speech.audio.safetensors", *tiny], None),
        (["embed-audio", str(speech), "-o", "quiet.safetensors", *tiny, "-q"], None),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "speech.audio.safetensors\n"
    assert "Traceback" not in result.stderr
    stage = stages.load_stage(tmp_path / "speech.audio.safetensors", stages.AUDIO, model="tiny-random")
    assert stage.meta["num_frames"] == math.ceil(1.5 * 25)

    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stdout == "quiet.safetensors\n"
    noise = [line for line in quiet.stderr.splitlines() if line.strip() and "warning" not in line.lower()]
    assert noise == [], quiet.stderr
    again = stages.load_stage(tmp_path / "quiet.safetensors", stages.AUDIO)
    assert stage["features"].equal(again["features"])  # same input, same preset → same features
    assert sorted(p.name for p in tmp_path.iterdir()) == ["quiet.safetensors", "speech.audio.safetensors"]
