"""The embed-audio stage: official wav2vec numerics, long-input windowing, stage files, vocal separation."""

from __future__ import annotations

import json
import math
import wave

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from hallo3_cli.store import write_marker
from hallo3_cli import audio, stages, vocals
from hallo3_cli.jobs import embed_audio
from hallo3_cli.loading import load_feature_extractor, load_network
from hallo3_cli.errors import InputError, ModelError, OutputError
from hallo3_cli.presets import get_preset


def write_wav(path, signal: np.ndarray, rate: int = 16000) -> None:
    data = np.round(np.clip(signal, -1, 1) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes(data.tobytes())


def speechlike(seconds: float, rate: int = 16000, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    pitch = 140 + 25 * np.sin(2 * np.pi * rng.uniform(0.3, 1.0) * t)
    phase = 2 * np.pi * np.cumsum(pitch) / rate
    voiced = sum(np.sin(k * phase + rng.uniform(0, 6.3)) / k for k in range(1, 30))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 3.7 * t) ** 2
    return (0.2 * envelope * voiced + 0.01 * rng.standard_normal(t.shape)).astype(np.float32)


@pytest.fixture(scope="module")
def tiny_official(official_dir):
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    spec = json.loads((official_dir / "tiny_audio.json").read_text())
    tensors = load_file(official_dir / "tiny_audio.safetensors")
    model = Wav2Vec2Model(Wav2Vec2Config(**spec["wav2vec2_config"])).eval()
    # the fixture's keys are the official module names (weight-norm parametrisation included)
    weights = {k.removeprefix("wav2vec."): v for k, v in tensors.items() if k.startswith("wav2vec.")}
    model.load_state_dict(weights, strict=True)
    return spec, tensors, model


@pytest.fixture(scope="module")
def tiny_random():
    return load_network(get_preset("tiny-random"), "wav2vec", "cpu")


# ---------------------------------------------------------------------------------------------
# official numerics (docs/model.md §5 steps 2-5)


def test_reproduces_official_tiny_audio(tiny_official):
    spec, tensors, model = tiny_official
    features, n = audio.compute_features(tensors["waveform"].numpy(), model, fps=spec["fps"], clip_length=spec["clip_length"])
    assert n == spec["audio_length_unpadded"]
    assert features.shape == tuple(spec["shapes"]["audio_emb"])
    assert features.dtype == torch.float32
    assert (features - tensors["audio_emb"]).abs().max() <= 1e-5
    # layer k of the features is hidden_states[k + 1]
    torch.testing.assert_close(features[:, 0], tensors["all_hidden_states"][1, 0], atol=1e-5, rtol=0)
    windowed = audio.window_features(features, 0, features.shape[0])
    assert (windowed - tensors["audio_emb_windowed"]).abs().max() <= 1e-5


def test_normalisation_and_padding_matter(tiny_official):
    spec, tensors, model = tiny_official
    waveform = tensors["waveform"].numpy()
    raw, _ = audio.compute_features(waveform, model, normalize=False)
    assert (raw - tensors["audio_emb"]).abs().max() > 1e-3
    unpadded, n = audio.compute_features(waveform, model, clip_length=0)
    assert unpadded.shape[0] == n == spec["audio_length_unpadded"]
    # padding changes the first layer's GroupNorm statistics and the attention context
    assert (unpadded - tensors["audio_emb"][:n]).abs().max() > 1e-4


@pytest.mark.parametrize("samples,fps,expected", [(36800, 25, 58), (16000, 25, 25), (16001, 25, 26), (8000, 30, 15)])
def test_num_video_frames(samples, fps, expected):
    assert audio.num_video_frames(samples, fps) == expected


def test_window_features_clamps_at_both_ends():
    features = torch.arange(10, dtype=torch.float32)[:, None, None].expand(10, 2, 3).clone()
    windows = audio.window_features(features, 0, 10)
    assert windows.shape == (10, 5, 2, 3)
    assert windows[0, :, 0, 0].tolist() == [0, 0, 0, 1, 2]
    assert windows[5, :, 1, 2].tolist() == [3, 4, 5, 6, 7]
    assert windows[9, :, 0, 0].tolist() == [7, 8, 9, 9, 9]
    torch.testing.assert_close(audio.window_features(features, 3, 8), windows[3:8])
    assert audio.window_features(features, 4, 4).shape == (0, 5, 2, 3)
    assert audio.window_features(features, 0, 10, window=3)[0, :, 0, 0].tolist() == [0, 0, 1]
    with pytest.raises(ValueError):
        audio.window_features(features, 5, 11)
    with pytest.raises(ValueError):
        audio.window_features(features, 0, 5, window=4)


# ---------------------------------------------------------------------------------------------
# long inputs


@settings(max_examples=200, deadline=None)
@given(frames=st.integers(1, 5000), window=st.integers(3, 900), context=st.integers(0, 300))
def test_encoder_spans_tile_the_sequence_with_context(frames, window, context):
    if window <= 2 * context and frames > window:
        with pytest.raises(ValueError):
            audio.encoder_spans(frames, window, context)
        return
    spans = audio.encoder_spans(frames, window, context)
    assert spans[0][2] == 0 and spans[-1][3] == frames
    for (start, stop, keep_start, keep_stop), following in zip(spans, spans[1:] + [None]):
        assert 0 <= start <= keep_start < keep_stop <= stop <= frames
        assert stop - start <= window
        assert keep_start - start >= min(context, keep_start)
        assert stop - keep_stop >= min(context, frames - keep_stop)
        if following is not None:
            assert following[2] == keep_stop


@pytest.mark.parametrize("norm", ["group", "layer"])
def test_chunked_conv_features_equal_one_pass(monkeypatch, norm):
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    overrides = {"feat_extract_norm": norm, "conv_bias": norm == "layer"}
    config = Wav2Vec2Config(**{**get_preset("tiny-random").config("wav2vec"), **overrides})
    model = Wav2Vec2Model(config).eval()
    from hallo3_cli.networks import fill_random_

    fill_random_(model, 3, std=0.2)
    monkeypatch.setattr(audio, "CONV_CHUNK_FRAMES", 37)
    x = torch.from_numpy(speechlike(3.1)) * 3 + 0.1  # an offset makes the GroupNorm mean matter
    bar = audio._progress_bar(False, 0)
    with torch.inference_mode():
        whole = model.feature_extractor(x[None])[0].T
        chunked = audio._chunked_conv_features(model, x, bar)
    assert chunked.shape == whole.shape
    assert (chunked - whole).abs().max() <= 1e-5 * whole.abs().max()


def test_short_inputs_take_the_exact_whole_file_path(tiny_random):
    speech = speechlike(6.0)
    windowed, n = audio.compute_features(speech, tiny_random, window_seconds=30)
    whole, _ = audio.compute_features(speech, tiny_random, window_seconds=None)
    assert n == 150 and windowed.shape == (196, 2, 32)
    assert torch.equal(windowed, whole)


def local_encoder():
    """A tiny wav2vec2 whose attention carries no information (zero values): the encoder is then
    local (positional conv ±8 frames + per-frame layers), so windowing must not change anything."""
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    from hallo3_cli.networks import fill_random_

    model = Wav2Vec2Model(Wav2Vec2Config(**get_preset("tiny-random").config("wav2vec"))).eval()
    fill_random_(model, 1, std=0.2)
    with torch.no_grad():
        for layer in model.encoder.layers:
            layer.attention.v_proj.weight.zero_()
            layer.attention.v_proj.bias.zero_()
    return model


def test_windowing_is_exact_for_a_local_encoder(monkeypatch):
    monkeypatch.setattr(audio, "CONV_WHOLE_MAX_FRAMES", 100)  # chunked conv features too
    model = local_encoder()
    speech = speechlike(12.0, seed=1)
    whole, n = audio.compute_features(speech, model, window_seconds=None)
    windowed, _ = audio.compute_features(speech, model, window_seconds=4.0, context_seconds=1.0)
    assert n == 300 and windowed.shape == whole.shape == (343, 2, 32)
    assert (windowed - whole).abs().max() <= 1e-5 * whole.abs().max()
    # frames vary enough that a one-frame misalignment would show
    assert (whole[1:] - whole[:-1]).abs().mean() > 0.05 * whole.abs().mean()
    # a context narrower than the positional conv's reach (8 frames) is visibly wrong
    narrow, _ = audio.compute_features(speech, model, window_seconds=4.0, context_seconds=0.12)
    assert (narrow - whole).abs().max() > 1e-3 * whole.abs().max()


def test_windowed_attention_stays_close_to_whole_file(tiny_random):
    speech = speechlike(32.0, seed=2)
    whole, n = audio.compute_features(speech, tiny_random, window_seconds=None)
    windowed, _ = audio.compute_features(speech, tiny_random)  # default 30 s windows: two spans here
    error = (windowed - whole).abs()
    assert 0 < error.max() < 1e-2 * whole.abs().max()  # attention beyond the span is all that is missing


# ---------------------------------------------------------------------------------------------
# encoder loading


def test_tiny_random_encoder_is_seeded_and_sized():
    first = load_network(get_preset("tiny-random"), "wav2vec")
    second = load_network(get_preset("tiny-random"), "wav2vec")
    extractor = load_feature_extractor(get_preset("tiny-random"))
    assert extractor.sampling_rate == 16000 and extractor.do_normalize
    assert first.config.hidden_size == 32 and first.config.num_hidden_layers == 2
    assert not first.training
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name


def test_release_encoder_loads_from_the_model_home(tmp_path, monkeypatch, tiny_random):
    monkeypatch.setenv("HALLO3_HOME", str(tmp_path))
    preset = get_preset("hallo3")
    with pytest.raises(ModelError, match="hallo3 download"):
        load_network(preset, "wav2vec")
    folder = preset.component_dir("wav2vec")
    tiny_random.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({"sampling_rate": 16000, "do_normalize": True}))
    write_marker(folder)  # installed: its files listed with their sizes
    model = load_network(preset, "wav2vec")
    assert load_feature_extractor(preset).do_normalize is True
    speech = speechlike(2.0)
    torch.testing.assert_close(
        audio.compute_features(speech, model)[0], audio.compute_features(speech, tiny_random)[0], atol=0, rtol=0
    )
    (folder / "preprocessor_config.json").write_text(json.dumps({"sampling_rate": 8000}))
    with pytest.raises(ModelError, match="damaged"):  # an edited file is not installed any more...
        load_feature_extractor(preset)
    write_marker(folder)  # ...until installed again
    with pytest.raises(ModelError, match="8000 Hz"):
        load_feature_extractor(preset)


# ---------------------------------------------------------------------------------------------
# the stage


def test_embed_audio_writes_a_valid_stage(tmp_path, tiny_random):
    speech = tmp_path / "speech.wav"
    write_wav(speech, speechlike(3.0))
    out = embed_audio(speech, tmp_path / "speech.audio.safetensors", model="tiny-random", device="cpu", progress=False)
    stage = stages.load_stage(out, stages.AUDIO, model="tiny-random")
    assert stage.meta["num_frames"] == 75 and stage.meta["fps"] == 25 and stage.meta["clip_length"] == 49
    assert stage.meta["sample_rate"] == 16000
    assert stage["features"].shape == (98, 2, 32) and stage["features"].dtype == torch.float32
    assert stage.weights == get_preset("tiny-random").fingerprint("wav2vec")
    assert stage.params["separate_vocals"] is False and stage.params["fps"] == 25
    from hallo3_cli.audio_io import load_audio
    from hallo3_cli.fsutil import sha256_file

    assert stage.meta["source_sha256"] == sha256_file(speech)
    expected, _ = audio.compute_features(load_audio(speech), tiny_random)
    assert torch.equal(stage["features"], expected)


def test_embed_audio_checks_the_output_before_any_work(tmp_path):
    bad_speech = tmp_path / "bad.wav"
    bad_speech.write_text("not audio")
    with pytest.raises(OutputError):
        embed_audio(bad_speech, tmp_path / "no" / "x.safetensors", model="tiny-random", progress=False)
    out = tmp_path / "x.safetensors"
    with pytest.raises(InputError, match="not a readable audio file"):
        embed_audio(bad_speech, out, model="tiny-random", device="cpu", progress=False)
    assert list(tmp_path.iterdir()) == [bad_speech]  # no partial output


def test_separate_vocals_needs_release_weights(tmp_path, monkeypatch):
    speech = tmp_path / "speech.wav"
    write_wav(speech, speechlike(1.0))
    with pytest.raises(ModelError, match="hallo3"):
        embed_audio(speech, tmp_path / "o.safetensors", model="tiny-random", separate_vocals=True, progress=False)
    monkeypatch.setenv("HALLO3_HOME", str(tmp_path / "home"))
    with pytest.raises(ModelError, match="hallo3 download"):
        vocals.find_separator_model(get_preset("hallo3"))
    folder = get_preset("hallo3").component_dir("audio_separator")
    (folder / "audio_separator").mkdir(parents=True)
    (folder / "audio_separator" / "Kim_Vocal_2.onnx").write_bytes(b"x")
    write_marker(folder)  # installed: its files listed with their sizes
    assert vocals.find_separator_model(get_preset("hallo3")).name == "Kim_Vocal_2.onnx"


def test_cli_embed_audio(tmp_path, capsys):
    from hallo3_cli.cli import main

    speech = tmp_path / "speech.wav"
    write_wav(speech, speechlike(1.5))
    out = tmp_path / "f.safetensors"
    main(["embed-audio", str(speech), "-o", str(out), "--model", "tiny-random", "--device", "cpu", "-q"])
    assert capsys.readouterr().out.strip() == str(out)
    assert stages.load_stage(out, stages.AUDIO).meta["num_frames"] == math.ceil(1.5 * 25)
    with pytest.raises(SystemExit) as caught:
        main(["embed-audio", str(tmp_path / "none.wav"), "-o", str(out), "--model", "tiny-random", "-q"])
    assert caught.value.code == InputError.exit_code
    assert "no such file" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# vocal separation (MDX-Net inference on onnxruntime, with small stand-in graphs)


def mdx_graph(path, dim_f: int, dim_t: int, scale: float | None = None, batch="batch") -> None:
    """An ONNX graph with the MDX-Net interface: identity, or multiplication by ``scale``."""
    import onnx
    from onnx import TensorProto, helper

    shape = [batch, 4, dim_f, dim_t]
    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)]
    outputs = [helper.make_tensor_value_info("output", TensorProto.FLOAT, shape)]
    if scale is None:
        nodes, init = [helper.make_node("Identity", ["input"], ["output"])], []
    else:
        nodes = [helper.make_node("Mul", ["input", "scale"], ["output"])]
        init = [helper.make_tensor("scale", TensorProto.FLOAT, [], [scale])]
    graph = helper.make_graph(nodes, "mdx_stand_in", inputs, outputs, init)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def tones(seconds: float, freqs, amplitude=0.2, rate=44100) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    left = sum(amplitude * np.sin(2 * np.pi * f * t) for f in freqs)
    right = sum(amplitude * np.sin(2 * np.pi * f * t + 1.0) for f in freqs)
    return np.stack([left, right]).astype(np.float32)


PARAMS = vocals.MDXParams(n_fft=512, hop_length=128, compensate=1.0)
INNER = (slice(None), slice(512, -512))  # the abrupt start and end of the tones lose their lowest bins


def test_mdx_identity_model_reconstructs_the_input(tmp_path):
    path = tmp_path / "identity.onnx"
    mdx_graph(path, dim_f=257, dim_t=64)
    separator = vocals.MDXSeparator(path, PARAMS)
    assert (separator.dim_f, separator.dim_t, separator.chunk) == (257, 64, 128 * 63)
    mix = tones(2.0, [1000, 2500])
    out = separator(mix)
    assert out.shape == mix.shape and out.dtype == np.float32
    assert np.abs(out - mix)[INNER].max() < 2e-4
    mono = separator(mix[0])
    np.testing.assert_allclose(mono[0], mono[1])
    assert np.abs(mono[0] - mix[0])[512:-512].max() < 2e-4


def test_mdx_spectrum_layout_and_band_limits(tmp_path):
    path = tmp_path / "identity.onnx"
    mdx_graph(path, dim_f=128, dim_t=64, batch=1)
    separator = vocals.MDXSeparator(path, PARAMS)
    wave_ = tones(0.2, [1000])[:, : separator.chunk]
    spec = separator.spectrum(wave_)
    assert spec.shape == (4, 128, 64)
    assert np.all(spec[:, :3] == 0)  # lowest bins zeroed
    reference = torch.stft(torch.from_numpy(wave_[1]), 512, 128, window=torch.hann_window(512), return_complex=True)
    np.testing.assert_allclose(spec[2, 3:], reference.real[3:128].numpy(), atol=1e-4)
    np.testing.assert_allclose(spec[3, 3:], reference.imag[3:128].numpy(), atol=1e-4)
    # dim_f = 128 of 257 bins keeps up to ~11 kHz: 1 kHz passes, 15 kHz is removed
    out = separator(tones(1.0, [1000, 15000]))
    assert np.abs(out - tones(1.0, [1000]))[INNER].max() < 1e-3


def test_mdx_scaling_model_and_compensation(tmp_path):
    path = tmp_path / "half.onnx"
    mdx_graph(path, dim_f=257, dim_t=32, scale=0.5)
    mix = tones(1.5, [800, 3000])
    out = vocals.MDXSeparator(path, vocals.MDXParams(n_fft=512, hop_length=128, compensate=1.2))(mix)
    assert np.abs(out - 0.6 * mix)[INNER].max() < 2e-4
    loud = vocals.MDXSeparator(path, PARAMS)(tones(1.5, [800], amplitude=4.0))
    assert np.abs(loud[INNER]).max() == pytest.approx(0.45, rel=1e-3)  # input limited to a 0.9 peak first


def test_mdx_model_errors(tmp_path):
    with pytest.raises(ModelError, match="unknown MDX-Net model"):
        vocals.MDXSeparator(tmp_path / "mystery.onnx")
    with pytest.raises(ModelError, match="not found"):
        vocals.MDXSeparator(tmp_path / "Kim_Vocal_2.onnx")
    corrupt = tmp_path / "Kim_Vocal_2.onnx"
    corrupt.write_bytes(b"not a model")
    with pytest.raises(ModelError, match="cannot load"):
        vocals.MDXSeparator(corrupt)
    wrong = tmp_path / "wrong.onnx"
    mdx_graph(wrong, dim_f=257, dim_t=64)
    with pytest.raises(ModelError, match="frequency bins"):
        vocals.MDXSeparator(wrong, vocals.MDXParams(n_fft=256))
