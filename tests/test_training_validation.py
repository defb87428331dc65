"""Validation renders while training (hallo3_cli.training.validation): the held-out portrait + speech rendered with an
in-memory pipeline through ``hallo3 render``'s code path, scored with ``hallo3 eval``'s API, the scores written
beside the video and to TensorBoard; the trainer's pipeline left as it was; "not scored" instead of a failure.
Uses the tiny-test preset (tiny-random at 64×96, 2 steps) to keep each render short."""

from __future__ import annotations

import json
import wave
from pathlib import Path

import pytest
import torch

from hallo3_cli.errors import ArgumentError, InputError, ModelError
from hallo3_cli.training import validation
from hallo3_cli.training.validation import log_scores, validate

PRESETS = Path(__file__).with_name("presets_test.toml")
MODEL = "tiny-test"
pytestmark = pytest.mark.usefixtures("test_presets")


@pytest.fixture(scope="module")
def pipe(test_presets):
    from hallo3_cli.loading import load_pipeline

    pipe = load_pipeline(MODEL, device="cpu")
    pipe.transformer.train()  # as a trainer holds it
    return pipe


@pytest.fixture(scope="module")
def first(pipe, media_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    components = dict(pipe.components)
    result = validate(pipe, run, 12, portrait=media_dir / "face_0001.jpg", speech=media_dir / "speech_0001.wav",
                      model=MODEL)
    return run, components, result


def _frames(video: Path):
    from hallo3_cli.video_io import read_video

    return read_video(video)[0]


def test_render_scores_and_files(pipe, first):
    from hallo3_cli.evaluate.run import rendered_with
    from hallo3_cli.video_io import read_video

    run, components, result = first
    folder = run / "validation"
    video, scores = folder / "step-000012.mp4", folder / "step-000012.eval.json"
    assert result["video"] == video and result["scores"] == scores and result["step"] == 12
    # one clip's new frames (47 at 25 fps), with the held-out speech cut to that length muxed in
    frames, fps, audio_seconds = read_video(video)
    assert len(frames) == 47 and fps == 25 and audio_seconds == pytest.approx(1.88, abs=0.03)
    with wave.open(str(folder / "speech.wav")) as speech:
        assert speech.getnframes() == 47 * 640 and speech.getframerate() == 16000
    assert rendered_with(video) == MODEL  # the render's tag: written by hallo3 render's VideoRenderer
    # scored with hallo3 eval (tiny-test: random SyncNet, no face models → no identity)
    assert result["not_scored"] is None
    for key in ("sync_c", "sync_d"):
        assert isinstance(result[key], float) and result[key] == result[key]
    assert isinstance(result["av_offset"], int) and result["identity"] is None and result["face_ratio"] is None
    record = json.loads(scores.read_text())
    assert record["step"] == 12 and record["sync_confidence"] == result["sync_c"]
    assert record["sync_distance"] == result["sync_d"] and record["frames"] == 47 and record["steps"] == 2
    # nothing else left in the folder (the per-render cache is removed)
    assert sorted(p.name for p in folder.iterdir()) == ["speech.wav", "step-000012.eval.json", "step-000012.mp4"]
    # the trainer's pipeline: the same components, the networks back in their modes
    assert all(pipe.components[name] is module for name, module in components.items())
    assert pipe.transformer.training and not pipe.vae.training


def test_scores_go_to_tensorboard(first, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    _, _, result = first
    writer = SummaryWriter(str(tmp_path))
    log_scores(writer, result)
    log_scores(writer, {"step": 13, "not_scored": "no SyncNet weights"})
    writer.close()
    events = EventAccumulator(str(tmp_path), size_guidance={"tensors": 0}).Reload()
    assert sorted(events.Tags()["scalars"]) == ["validation/av_offset", "validation/sync_c", "validation/sync_d"]
    (point,) = events.Scalars("validation/sync_c")
    assert point.step == 12 and point.value == pytest.approx(result["sync_c"])
    (text,) = events.Tensors("validation/not_scored/text_summary")
    assert text.step == 13 and b"not scored: no SyncNet weights" in text.tensor_proto.string_val[0]


def test_the_pipeline_s_own_weights_render_and_a_missing_scorer_does_not_fail(pipe, first, media_dir, monkeypatch):
    """After a change to the pipeline's (trained) transformer the render changes; when hallo3 eval cannot score,
    the result and the JSON say why and nothing fails."""
    import hallo3_cli.evaluate

    run, _, before = first

    def unavailable(*args, **kwargs):
        raise ModelError("syncnet weights are not installed; run hallo3 download --component syncnet")

    monkeypatch.setattr(hallo3_cli.evaluate, "evaluate_video", unavailable)
    original = {name: p.detach().clone() for name, p in pipe.transformer.named_parameters()}
    try:
        with torch.no_grad():
            pipe.transformer.proj_out.weight.mul_(3.0)
        result = validate(pipe, run, 13, portrait=media_dir / "face_0001.jpg", speech=media_dir / "speech_0001.wav",
                          model=MODEL)
    finally:
        with torch.no_grad():
            for name, p in pipe.transformer.named_parameters():
                p.copy_(original[name])
    assert result["not_scored"].startswith("syncnet weights are not installed")
    assert all(result[key] is None for key in validation.SCORES)
    record = json.loads(result["scores"].read_text())
    assert record["not_scored"] == result["not_scored"] and "sync_confidence" not in record
    a, b = _frames(before["video"]), _frames(result["video"])
    assert a.shape == b.shape and abs(a.astype(int) - b.astype(int)).max() > 0


def test_bad_arguments_fail_before_any_work(pipe, media_dir, tmp_path):
    face, speech = media_dir / "face_0001.jpg", media_dir / "speech_0001.wav"
    cases = [(dict(step=-1), ArgumentError, "step"), (dict(max_seconds=0), ArgumentError, "max_seconds"),
             (dict(max_seconds=float("nan")), ArgumentError, "max_seconds"),
             (dict(portrait=tmp_path / "none.jpg"), InputError, "none.jpg"), (dict(model="nope"), ArgumentError, "model")]
    for change, error, words in cases:
        arguments = {**dict(step=1, portrait=face, speech=speech, model=MODEL), **change}
        with pytest.raises(error, match=words):
            validate(pipe, tmp_path / "run", arguments.pop("step"), **arguments)
    assert not (tmp_path / "run").exists()
