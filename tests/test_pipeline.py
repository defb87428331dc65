"""``Hallo3Pipeline`` as a diffusers user sees it: the public call, its agreement with the CLI, the frames of the
render before the pipeline existed, save/load through ``model_index.json``, another scheduler, and a full
render through the face path (test-built ONNX face models)."""

from __future__ import annotations

import os
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("test_presets")]

PRESETS = Path(__file__).with_name("presets_test.toml")
GOLDEN = Path(__file__).with_name("data") / "golden_tiny_test_seed7.json"
MODEL = "tiny-test"


@pytest.fixture(scope="module")
def speech(media_dir, tmp_path_factory) -> Path:
    """The first 2.2 s of speech_0001.wav (stereo 44.1 kHz): 2 clips."""
    target = tmp_path_factory.mktemp("speech") / "two.wav"
    with wave.open(str(media_dir / "speech_0001.wav")) as src:
        params, frames = src.getparams(), src.readframes(int(2.2 * src.getframerate()))
    with wave.open(str(target), "wb") as dst:
        dst.setparams(params)
        dst.writeframes(frames)
    return target


def hallo3(*args, cwd=None) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "hallo3_cli", *map(str, args)], capture_output=True, text=True, cwd=cwd)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


@pytest.fixture(scope="module")
def cli_latents(media_dir, speech, tmp_path_factory) -> torch.Tensor:
    """``hallo3 embed-audio`` + ``encode-ref`` + ``render --audio --ref --seed 7``, as the README shows."""
    root = tmp_path_factory.mktemp("cli")
    hallo3("embed-audio", speech, "-o", root / "a.safetensors", "--model", MODEL, "-q")
    hallo3("encode-ref", media_dir / "face_0003.jpg", "-o", root / "r.safetensors", "--model", MODEL, "-q")
    hallo3("render", "--audio", root / "a.safetensors", "--ref", root / "r.safetensors", "-o", root / "clips.safetensors",
           "--seed", "7", "-q")
    return load_file(str(root / "clips.safetensors"))["latents"]


@pytest.fixture(scope="module")
def pipe():
    from hallo3_cli import Hallo3Pipeline

    pipe = Hallo3Pipeline.from_pretrained(MODEL)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def output(pipe, media_dir, speech):
    return pipe(image=str(media_dir / "face_0003.jpg"), audio=str(speech), prompt=None, seed=7, num_inference_steps=None,
                guidance_scale=3.5, output_type="np")


def video_frames(speech: Path) -> int:
    from hallo3_cli.audio import num_video_frames
    from hallo3_cli.audio_io import load_audio

    return num_video_frames(len(load_audio(speech)))  # ceil(2.2 s × 25) in the official float formula: 56


def test_public_call_frames_and_latents(output, speech):
    assert isinstance(output.frames, np.ndarray) and output.frames.dtype == np.uint8
    assert output.frames.shape == (video_frames(speech), 64, 64, 3)  # trimmed; a square portrait comes back square
    assert output.latents.shape == (2, 13, 16, 8, 12) and output.fps == 25
    assert output.frames.std() > 0


def test_latents_equal_the_cli_bit_for_bit(output, cli_latents):
    assert torch.equal(output.latents, cli_latents)


def test_render_matches_the_latents_recorded_before_the_pipeline(cli_latents):
    """Recorded on main before Hallo3Pipeline: the only change is CFG on v instead of x0 (the same maths,
    another rounding; the clip format version was bumped so old cached clips are never mixed in)."""
    import json

    golden = json.loads(GOLDEN.read_text())
    assert list(cli_latents.shape) == golden["shape"]
    assert abs(cli_latents.abs().max().item() - golden["abs_max"]) <= 1e-5 * golden["abs_max"]
    ours = cli_latents.flatten()[:: golden["stride"]].double()
    error = ((ours - torch.tensor(golden["values"], dtype=torch.float64)).abs().max() / golden["abs_max"]).item()
    assert 0 <= error <= 1e-5, error


def test_save_and_load_through_model_index(pipe, output, media_dir, speech, tmp_path):
    from hallo3_cli import Hallo3Pipeline

    pipe.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "model_index.json").is_file()
    loaded = Hallo3Pipeline.from_pretrained(tmp_path / "saved", torch_dtype=torch.float32)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.config.height == 64 and loaded.config.default_steps == 2
    again = loaded(image=str(media_dir / "face_0003.jpg"), audio=str(speech), seed=7, output_type="latent")
    assert again.frames is None and torch.equal(again.latents, output.latents)


def test_another_diffusers_scheduler_can_be_swapped_in(pipe, media_dir, speech, output):
    from diffusers import DDIMScheduler

    from hallo3_cli.scheduling_hallo3 import Hallo3DPMSolverSDEScheduler

    original = pipe.scheduler
    pipe.scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   prediction_type="v_prediction", timestep_spacing="trailing", rescale_betas_zero_snr=True)
    try:
        ddim = pipe(image=str(media_dir / "face_0003.jpg"), audio=str(speech), seed=7, output_type="latent")
    finally:
        pipe.scheduler = original
    assert isinstance(pipe.scheduler, Hallo3DPMSolverSDEScheduler)
    assert torch.isfinite(ddim.latents).all() and not torch.equal(ddim.latents, output.latents)


def test_bad_arguments_are_usage_errors(pipe, media_dir, speech):
    from hallo3_cli import Hallo3Pipeline
    from hallo3_cli.errors import Hallo3Error

    for kwargs in ({"guidance_scale": float("nan")}, {"num_inference_steps": 0}, {"output_type": "gif"}):
        with pytest.raises(Hallo3Error) as info:
            pipe(image=str(media_dir / "face_0003.jpg"), audio=str(speech), **kwargs)
        assert info.value.exit_code == 2
    with pytest.raises(Hallo3Error, match="neither a model preset"):
        Hallo3Pipeline.from_pretrained("no-such-preset")


def test_a_non_finite_latent_stops_naming_clip_and_step(pipe, media_dir, speech):
    from hallo3_cli.errors import NonFiniteError

    def poison(pipe_, step, timestep, tensors):
        return {"latents": tensors["latents"] * float("nan")} if step == 0 else {}

    calls = []

    def check(pipe_, step, timestep, tensors):
        calls.append(step)
        return {}

    with pytest.raises(NonFiniteError, match=r"at clip 1, step 2/2; nothing was written"):
        pipe(image=str(media_dir / "face_0003.jpg"), audio=str(speech), seed=7, output_type="latent",
             callback_on_step_end=lambda *a: poison(*a) or check(*a))


# ---------------------------------------------------------------------------------------------
# the face path, end to end


@pytest.fixture(scope="module")
def face_preset(tmp_path_factory):
    """tiny-test with test-built SCRFD/ArcFace ONNX models (tests/test_face.py's builders)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from test_face import make_matmul_recognizer, make_scrfd

    from hallo3_cli import face

    root = tmp_path_factory.mktemp("face_preset")
    models = root / "face_models"
    models.mkdir()
    make_scrfd(models / face.DETECTOR_FILE, base=2.0, gain=1.0)
    make_matmul_recognizer(models / face.RECOGNIZER_FILE, np.random.default_rng(0).normal(size=(588, 512)))
    table = PRESETS.read_text().replace("[tiny-test", "[tiny-face")
    table = table.replace('description = "tiny-random at 64x96', f'face_models = "{models}"\ndescription = "tiny-random at 64x96', 1)
    (root / "presets.toml").write_text(table)
    old = os.environ["HALLO3_PRESETS"]
    os.environ["HALLO3_PRESETS"] = f"{old}{os.pathsep}{root / 'presets.toml'}"
    yield "tiny-face"
    os.environ["HALLO3_PRESETS"] = old


def test_full_render_through_face_detection_embedding_and_mask(face_preset, media_dir, speech, tmp_path):
    """A render whose portrait has a detected face: the embedding, the face box and the mask reach the model."""
    from PIL import Image

    from hallo3_cli import stages
    from hallo3_cli.jobs import render_video
    from hallo3_cli.video_io import read_video

    sys.path.insert(0, str(Path(__file__).parent))
    from test_face import det_scale, paint_cell, smooth_image

    image = smooth_image(300, 200, seed=1)
    image[..., 0] = 0
    paint_cell(image, 4, 6, det_scale(300, 200), (255, 128, 128))  # the fake detector's "face"
    Image.fromarray(image).save(tmp_path / "portrait.png")
    out = render_video(tmp_path / "portrait.png", speech, tmp_path / "out.mp4", model=face_preset, seed=7,
                       cache_dir=tmp_path / "cache", progress=False)
    reference = stages.load_stage(next((tmp_path / "cache").glob("*.ref.safetensors")), stages.REFERENCE)
    assert reference.meta["face_found"] is True
    embedding = reference["face_embedding"]
    assert embedding.shape == (512,) and embedding.abs().sum() > 0
    x0, y0, x1, y1 = reference["face_box"].tolist()
    assert 0 <= x0 < x1 <= 96 and 0 <= y0 < y1 <= 64 and (x1 - x0) * (y1 - y0) < 96 * 64  # a face, not the whole frame
    frames, fps, _ = read_video(out)
    assert frames.shape == (video_frames(speech), 64, 96, 3) and fps == 25
