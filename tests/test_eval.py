"""``hallo3 eval``: SyncNet scores against syncnet_python (the PyPI ``syncnet-python`` package), MFCCs
against python_speech_features, crops against OpenCV, identity on ONNX face models built here, and
the command on real media."""

from __future__ import annotations

import importlib.util
import json
import os
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hallo3_cli.store import write_marker
from hallo3_cli.errors import InputError, ModelError
from hallo3_cli.evaluate import frames as vf
from hallo3_cli.evaluate.mfcc import mfcc, to_pcm16
from hallo3_cli.evaluate.scores import SyncScorer
from hallo3_cli.evaluate.syncnet import SyncNetModel, convert_original_state_dict, load_syncnet, randomize_
from hallo3_cli.presets import get_preset
from hallo3_cli.video_io import VideoWriter

TINY = dict(audio_channels=(8, 16, 16, 16, 16, 32), lip_channels=(8, 16, 16, 16, 16, 32), hidden_dim=32, embedding_dim=32)


def _peer_module(file: str):
    """A module of the installed syncnet_python package, loaded by path: its ``__init__`` imports the
    S3FD/scenedetect pipeline, which the score computation does not need."""
    spec = importlib.util.find_spec("syncnet_python")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("syncnet-python is not installed (pip install --no-deps syncnet-python==0.2.3)")
    path = Path(list(spec.submodule_search_locations)[0]) / file
    module_spec = importlib.util.spec_from_file_location(f"peer_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def _random_crops(count: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8).astype(np.int16)
    return [np.clip(base + rng.integers(-40, 40, base.shape), 0, 255).astype(np.uint8) for _ in range(count)]


# ---------------------------------------------------------------------------------------------
# MFCC, crops


def test_mfcc_equals_python_speech_features():
    psf = pytest.importorskip("python_speech_features")
    rng = np.random.default_rng(0)
    for length in (90, 400, 401, 16000, 23457):
        signal = rng.normal(0, 4000, length).astype(np.int16)
        expected = psf.mfcc(signal, 16000)
        ours = mfcc(signal, block_frames=7)  # small blocks: the block joins must not show
        assert ours.shape == expected.shape == (max(1, 1 + -(-(length - 400) // 160)), 13)
        assert np.allclose(ours, expected, rtol=1e-12, atol=1e-9)
    silence = np.zeros(3000, np.int16)
    assert np.allclose(mfcc(silence), psf.mfcc(silence, 16000), rtol=1e-12, atol=1e-9)


def test_pcm16_rounds_like_ffmpeg():
    assert to_pcm16(np.array([0.0, 1.0, -1.0, 0.5, 1.5e-5, -2.0])).tolist() == [0, 32767, -32768, 16384, 0, -32768]


def test_crop_and_smoothing_follow_syncnet_python():
    cv2 = pytest.importorskip("cv2")
    signal = pytest.importorskip("scipy.signal")
    rng = np.random.default_rng(2)
    values = rng.uniform(0, 100, 40)
    assert np.array_equal(vf.median_filter(values), signal.medfilt(values, 13))
    image = rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)
    for size, x, y in [(20.3, 80.1, 60.7), (50, 10, 5), (70, 150, 110), (15, 80, 60)]:
        pad = int(size * 1.8)  # run_pipeline.py's crop, written out with numpy and OpenCV
        padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)), "constant", constant_values=(110, 110))
        my, mx = y + pad, x + pad
        face = padded[int(my - size) : int(my + size * 1.8), int(mx - size * 1.4) : int(mx + size * 1.4)]
        assert np.array_equal(vf.lip_crop(image, size, x, y), cv2.resize(face, (224, 224)))
    boxes = np.array([[10, 20, 50, 70], [np.nan] * 4, [14, 20, 54, 70]], np.float64)
    track = vf.smooth_track(boxes)
    assert track.shape == (3, 3)  # the gap is interpolated before the (zero-padded) median filter
    assert np.allclose(track[:, 1], vf.median_filter([30, 32, 34]))


# ---------------------------------------------------------------------------------------------
# SyncNet against the peer


@pytest.fixture(scope="module")
def peer_net():
    """syncnet_python's own network ``S`` (release widths) with seeded weights and BatchNorm statistics."""
    model = _peer_module("SyncNetModel.py")
    torch.manual_seed(0)
    net = model.S()
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.running_mean.normal_(0, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.2)
        # both towers end near one shared vector: real partners beat the zero padding, so the best
        # offset lies inside the window and the comparison exercises the alignment
        shared = torch.randn(1024, generator=torch.Generator().manual_seed(1)) * 5
        for head in (net.netfcaud[-1], net.netfclip[-1]):
            head.weight.mul_(0.05)
            head.bias.copy_(shared)
    return net.eval()


@pytest.mark.parametrize("frames,samples", [(26, 24000), (30, 16640)], ids=["video-limited", "audio-limited"])
def test_sync_scores_equal_syncnet_python(peer_net, tmp_path, frames, samples):
    cv2 = pytest.importorskip("cv2")
    pytest.importorskip("python_speech_features")
    from scipy.io import wavfile

    instance = _peer_module("SyncNetInstance.py")
    ours = SyncNetModel()
    ours.load_state_dict(convert_original_state_dict(peer_net.state_dict(), ours))
    ours.eval()
    crops = _random_crops(frames, seed=frames)
    for index, crop in enumerate(crops):  # PNG bytes under the .jpg names it globs: lossless, read by content
        assert cv2.imencode(".png", crop)[1].tofile(str(tmp_path / f"{index + 1:06d}.jpg")) is None
    pcm = np.random.default_rng(samples).normal(0, 3000, samples).astype(np.int16)
    wavfile.write(tmp_path / "audio.wav", 16000, pcm)
    opt = types.SimpleNamespace(tmp_dir=str(tmp_path), batch_size=20, vshift=15)
    offset, confidence, distance = instance.SyncNetInstance(peer_net, device="cpu").evaluate(opt)

    result = SyncScorer(ours, pcm).extend(iter(crops)).finish()
    assert result.windows == min(frames, samples // 640) - 5
    assert result.offset == offset
    assert abs(result.confidence - confidence) < 1e-4 and abs(result.distance - distance) < 1e-4
    assert confidence > 1e-3 and -15 < offset < 15  # a real minimum, not a tie at the padded edges


def test_syncnet_weight_conversion_and_release_loading(tmp_path, monkeypatch):
    """The release path: a pickled original state dict, checksum-checked, read with weights_only."""
    import hashlib

    original = SyncNetModel(**TINY)
    randomize_(original, seed=3)
    inverse = {v: k for k, v in {"netcnnaud.": "audio_encoder.", "netfcaud.": "audio_head.", "netcnnlip.": "lip_encoder.",
                                 "netfclip.": "lip_head."}.items()}
    state = {}
    for key, value in original.state_dict().items():
        prefix = next(p for p in inverse if key.startswith(p))
        state["__S__." + inverse[prefix] + key[len(prefix):]] = value
    home = tmp_path / "home"
    folder = home / "hallo3" / "syncnet"
    folder.mkdir(parents=True)
    torch.save(state, folder / "syncnet_v2.model")
    write_marker(folder)  # installed: its files listed with their sizes
    monkeypatch.setenv("HALLO3_HOME", str(home))
    preset = get_preset("hallo3")
    with pytest.raises(ModelError, match="checksum mismatch"):
        load_syncnet(preset)
    digest = hashlib.sha256((folder / "syncnet_v2.model").read_bytes()).hexdigest()
    table = {**preset.table, "components": {**preset.components, "syncnet": {**preset.components["syncnet"],
                                                                             "sha256": {"syncnet_v2.model": digest}}}}
    patched = type(preset)(preset.name, table)
    with pytest.raises(ModelError, match="do not match the architecture"):  # release widths, tiny file
        load_syncnet(patched)
    monkeypatch.setattr("hallo3_cli.evaluate.syncnet.SyncNetModel", lambda: SyncNetModel(**TINY))
    loaded = load_syncnet(patched)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in original.state_dict().items())
    torch.save({"net": torch.nn.Linear(2, 2)}, folder / "syncnet_v2.model")  # a pickled module: refused
    write_marker(folder)
    digest = hashlib.sha256((folder / "syncnet_v2.model").read_bytes()).hexdigest()
    patched.table["components"]["syncnet"]["sha256"]["syncnet_v2.model"] = digest
    with pytest.raises(ModelError, match="weights_only"):
        load_syncnet(patched)


def test_tiny_random_syncnet_is_seeded_and_finite():
    preset = get_preset("tiny-random")
    first, second = load_syncnet(preset), load_syncnet(preset)
    assert all(torch.equal(first.state_dict()[k], v) for k, v in second.state_dict().items())
    assert first.config.embedding_dim == 32
    with torch.no_grad():
        out = first.forward_lip(torch.rand(2, 3, 5, 224, 224) * 255)
    assert out.shape == (2, 32) and torch.isfinite(out).all() and out.std() > 0


# ---------------------------------------------------------------------------------------------
# identity on ONNX face models built here


def _face_frames(count: int, seed: int, face_every: int = 1) -> list[np.ndarray]:
    """320×320 frames: dim, smooth, changing background; a red 'face' cell for the fake SCRFD of
    test_face (it fires on cells whose red mean is high) on frames where ``i % face_every == 0``."""
    from test_face import paint_cell, smooth_image

    frames = []
    for index in range(count):
        image = (smooth_image(320, 320, seed=seed + index) // 3).astype(np.uint8)
        if index % face_every == 0:
            paint_cell(image, 8 + index % 3, 9, 2.0, (255, 40 + 5 * (index % 40), 0))
        frames.append(image)
    return frames


@pytest.fixture(scope="module")
def face_analyzer(tmp_path_factory):
    pytest.importorskip("onnx")
    from test_face import make_matmul_recognizer, make_scrfd

    from hallo3_cli.face import FaceAnalyzer

    root = tmp_path_factory.mktemp("eval_faces")
    weight = np.random.default_rng(4).normal(0, 1, (3 * 14 * 14, 512))
    return FaceAnalyzer(make_scrfd(root / "scrfd.onnx"), make_matmul_recognizer(root / "fc.onnx", weight))


def _write_video(path: Path, frames: list[np.ndarray], speech: Path | None) -> Path:
    height, width = frames[0].shape[:2]
    with VideoWriter(path, width, height, audio=speech) as writer:
        writer.write(np.stack(frames))
    return path


def test_identity_equals_direct_computation(face_analyzer, tmp_path, media_dir):
    from hallo3_cli.evaluate import evaluate_video

    video = _write_video(tmp_path / "faces.mp4", _face_frames(32, seed=1, face_every=4), media_dir / "speech_0003.wav")
    portrait = tmp_path / "portrait.png"
    Image.fromarray(_face_frames(1, seed=99)[0]).save(portrait)
    syncnet = randomize_(SyncNetModel(**TINY), seed=1).eval()

    report = evaluate_video(video, ref=portrait, model="tiny-random", device="cpu", analyzer=face_analyzer,
                            syncnet=syncnet, identity_stride=2)
    decoded = list(vf.iter_frames(video))
    reference = face_analyzer.analyze(np.asarray(Image.open(portrait).convert("RGB"))).embedding
    faces = [face_analyzer.analyze(frame) for frame in decoded]
    expected = [float(np.dot(f.embedding, reference) / np.linalg.norm(f.embedding) / np.linalg.norm(reference))
                for i, f in enumerate(faces) if f.found and i % 2 == 0]
    identity = report.identity
    assert identity.face_ratio == sum(f.found for f in faces) / len(faces) == 8 / 32
    assert identity.sampled == [i for i, f in enumerate(faces) if f.found and i % 2 == 0]
    assert np.allclose(identity.similarities, expected, atol=1e-6) and len(set(np.round(expected, 4))) > 1
    assert identity.mean == pytest.approx(np.mean(expected), abs=1e-6)
    assert identity.p5 == pytest.approx(np.percentile(expected, 5), abs=1e-6)
    data = report.to_dict()
    assert data["identity_reference"] == "portrait" and data["face_crop"] == "scrfd"
    assert len(data["per_second"]["identity_similarity"]) == len(data["per_second"]["sync_confidence"]) == 2
    assert data["per_second"]["face_ratio"] == [7 / 25, 1 / 7]  # faces on frames 0, 4, ..., 28

    alone = evaluate_video(video, model="tiny-random", device="cpu", analyzer=face_analyzer, syncnet=syncnet)
    first = next(f for f in faces if f.found).embedding  # without --ref: against the first face found
    again = [float(np.dot(faces[i].embedding, first) / np.linalg.norm(faces[i].embedding) / np.linalg.norm(first))
             for i in alone.identity.sampled]
    assert alone.identity.reference == "first_face_frame" and alone.identity.reference_frame == 0
    assert np.allclose(alone.identity.similarities, again, atol=1e-6) and alone.identity.sampled == [0, 20]


def test_faceless_video_and_portrait_are_input_errors(face_analyzer, tmp_path, media_dir):
    from hallo3_cli.evaluate import evaluate_video

    blank = [np.full((320, 320, 3), 60, np.uint8)] * 15
    video = _write_video(tmp_path / "blank.mp4", blank, media_dir / "speech_0003.wav")
    syncnet = randomize_(SyncNetModel(**TINY), seed=1).eval()
    with pytest.raises(InputError, match="no face found in any frame") as err:
        evaluate_video(video, model="tiny-random", device="cpu", analyzer=face_analyzer, syncnet=syncnet)
    assert err.value.exit_code == 3
    Image.fromarray(blank[0]).save(tmp_path / "blank.png")
    with pytest.raises(InputError, match="no face found in the portrait"):
        evaluate_video(video, ref=tmp_path / "blank.png", model="tiny-random", analyzer=face_analyzer, syncnet=syncnet)
    silent = _write_video(tmp_path / "silent.mkv", blank, None)
    with pytest.raises(InputError, match="no audio track; give the speech with --audio"):
        evaluate_video(silent, model="tiny-random", analyzer=face_analyzer, syncnet=syncnet)


def test_frame_rate_resampling_holds_frames(tmp_path):
    frames = [np.full((64, 64, 3), 10 * i, np.uint8) for i in range(10)]
    path = tmp_path / "ten.mov"
    with VideoWriter(path, 64, 64, fps=10) as writer:  # 1 s at 10 fps -> 25 frames at 25 fps
        writer.write(np.stack(frames))
    out = list(vf.iter_frames(path))
    assert len(out) == 25
    levels = [int(np.rint(frame.mean() / 10)) for frame in out]
    assert levels == [int(k * 10 / 25) for k in range(25)]


# ---------------------------------------------------------------------------------------------
# the command


@pytest.fixture(scope="module")
def talking(media_dir, tmp_path_factory):
    """A real recording muxed with a still portrait (2 s)."""
    portrait = np.asarray(Image.open(media_dir / "face_0001.jpg").convert("RGB"))[:480, :480]
    path = tmp_path_factory.mktemp("eval_media") / "still.mp4"
    return _write_video(path, [portrait] * 50, media_dir / "speech_0001.wav")


def test_eval_command_json_table_plot_and_errors(talking, tmp_path, monkeypatch, capsys):
    from test_cli import run

    from hallo3_cli.cli import main

    plot = tmp_path / "scores.png"  # as a user runs it, in a subprocess
    as_json = run("eval", str(talking), "--model", "tiny-random", "--json", "--plot", str(plot), cwd=tmp_path)
    assert as_json.returncode == 0, as_json.stderr
    data = json.loads(as_json.stdout)
    for key in ("sync_confidence", "sync_distance", "av_offset_frames", "identity_similarity", "face_ratio", "per_second"):
        assert key in data
    assert data["frames"] == 50 and data["windows"] == 45 and data["face_crop"] == "whole_frame"
    assert data["identity_similarity"] is None and "no face models" in as_json.stderr
    assert len(data["per_second"]["sync_confidence"]) == 2 and -15 <= data["av_offset_frames"] <= 15
    assert data["sync_confidence"] >= 0 and data["sync_distance"] > 0
    with Image.open(plot) as image:
        assert image.format == "PNG" and image.size == (1000, 650)
        assert len(np.unique(np.asarray(image.convert("RGB")).reshape(-1, 3), axis=0)) > 20  # drawn, not blank
    corrupt = tmp_path / "corrupt.mp4"  # the rest in-process, through the same main()
    corrupt.write_bytes(talking.read_bytes()[:3000])
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", str(corrupt), "--model", "tiny-random"])
    captured = capsys.readouterr()
    assert exit_info.value.code == 3 and captured.out == "" and "Traceback" not in captured.err
    assert captured.err.strip().count("\n") == 0 and captured.err.startswith(f"hallo3: error: {corrupt}: ")

    main(["eval", str(talking), "--model", "tiny-random", "--audio", str(talking), "-q"])  # in-process: the table
    table = capsys.readouterr().out
    assert "Sync-C" in table and "Sync-D" in table and f"{data['sync_confidence']:.3f}" in table

    for bad in (tmp_path / "scores.jpg", talking):  # not a PNG name; an input of the command
        with pytest.raises(SystemExit) as exit_info:
            main(["eval", str(talking), "--model", "tiny-random", "--plot", str(bad)])
        assert exit_info.value.code == 4 and str(bad) in capsys.readouterr().err
    assert not (tmp_path / "scores.jpg").exists()

    with pytest.raises(SystemExit) as exit_info:  # render --eval only scores an mp4 render
        main(["render", "--batch", str(tmp_path / "jobs.txt"), "--out-dir", str(tmp_path / "out"), "--eval"])
    assert exit_info.value.code == 2 and "--eval" in capsys.readouterr().err

    home = tmp_path / "home"  # the release's weights are not installed, and offline: exit 5 with the command
    monkeypatch.setenv("HALLO3_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", str(talking)])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 5 and err.count("\n") == 0 and "run: hallo3 download --model hallo3" in err
    assert not home.exists() or not any(home.rglob("*.model"))


def test_evaluate_render_writes_json_next_to_the_video(talking, tmp_path, media_dir):
    from hallo3_cli.evaluate import evaluate_render

    video = tmp_path / "out.mp4"
    video.write_bytes(talking.read_bytes())
    written = evaluate_render(video, media_dir / "speech_0001.wav", media_dir / "face_0001.jpg", model="tiny-random",
                              device="cpu")
    assert written == tmp_path / "out.eval.json"
    data = json.loads(written.read_text())
    assert data["video"] == str(video) and data["audio"] == str(media_dir / "speech_0001.wav")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.eval.json", "out.mp4"]
    assert os.stat(written).st_size > 100


@pytest.mark.parametrize("frames,samples", [(50, 28_000), (40, 50 * 640)], ids=["audio-limited", "video-limited"])
def test_streaming_equals_the_whole_computation_in_bounded_memory(frames, samples):
    """Many batches: the streamed distances equal one computation over all windows at once, and the
    scorer never holds more than a few batches of features."""
    net = randomize_(SyncNetModel(**TINY), seed=5).eval()
    crops = _random_crops(frames, seed=7)
    pcm = np.random.default_rng(8).normal(0, 3000, samples).astype(np.int16)
    scorer = SyncScorer(net, pcm, batch_size=8)
    held = 0
    for crop in crops:
        scorer.add(crop)
        held = max(held, len(scorer._lip) + len(scorer._audio) * scorer.batch_size + len(scorer._batch))
    result = scorer.finish()

    windows = min(frames, samples // 640) - 5
    with torch.no_grad():
        video = torch.from_numpy(np.stack(crops)).permute(3, 0, 1, 2).float()[None]
        lips = net.forward_lip(torch.cat([video[:, :, i : i + 5] for i in range(windows)]))
        coefficients = torch.from_numpy(mfcc(pcm).T.astype(np.float32))[None, None]
        audio = net.forward_audio(torch.cat([coefficients[..., 4 * i : 4 * i + 20] for i in range(windows)]))
    padded = torch.nn.functional.pad(audio, (0, 0, 15, 15))
    expected = torch.stack([torch.nn.functional.pairwise_distance(lips[[i]].repeat(31, 1), padded[i : i + 31])
                            for i in range(windows)])
    assert result.windows == windows and np.allclose(result.distances, expected.numpy(), rtol=1e-5, atol=1e-5)
    mean = expected.mean(0)
    assert result.offset == 15 - int(torch.argmin(mean)) and result.distance == pytest.approx(float(mean.min()), abs=1e-5)
    assert held <= 8 * 8  # (vshift + batch) lip features and a few audio batches, whatever the length


def _write_webm(path: Path, frames: list[np.ndarray], speech: Path) -> Path:
    """VP8 + Opus in WebM, as browsers and screen recorders write them (not our own writer)."""
    import av

    from hallo3_cli.audio_io import load_audio

    samples = load_audio(speech, 48000)[: round(len(frames) / 25 * 48000)]
    with av.open(str(path), "w", format="webm") as container:
        video = container.add_stream("libvpx", rate=25)
        video.width, video.height, video.pix_fmt = frames[0].shape[1], frames[0].shape[0], "yuv420p"
        audio = container.add_stream("libopus", rate=48000, layout="mono")
        for image in frames:
            container.mux(video.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(video.encode(None))
        for start in range(0, len(samples), 960):
            block = np.zeros((1, 960), np.float32)
            chunk = samples[start : start + 960]
            block[0, : len(chunk)] = chunk
            frame = av.AudioFrame.from_ndarray(block, format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 48000, start
            container.mux(audio.encode(frame))
        container.mux(audio.encode(None))
    return path


def test_webm_from_another_tool(media_dir, tmp_path):
    from hallo3_cli.evaluate import evaluate_video

    portrait = np.asarray(Image.open(media_dir / "face_0003.jpg").convert("RGB").resize((160, 160)))
    video = _write_webm(tmp_path / "talk.webm", [np.roll(portrait, k, axis=1) for k in range(32)], media_dir / "speech_0008.wav")
    report = evaluate_video(video, model="tiny-random", device="cpu")
    from hallo3_cli.audio_io import load_audio

    assert report.frames == 32 and report.sync.windows == min(32, len(load_audio(video, 16000)) // 640) - 5 >= 25
    assert report.crop == "whole_frame" and report.identity is None and np.isfinite(report.sync.confidence)
