"""``hallo3 prepare`` and ``Hallo3Dataset`` (docs/model.md §10.1–10.2) on synthetic talking-head videos made here
from the shared portraits and speech (tests/synthetic_video.py), with small fake SCRFD/ArcFace models
(tests/test_face.py's builders) in a tiny preset: what is kept and skipped and why, the stage files, the samples
and their alignment, resume, --check, and two processes sharing one dataset folder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import cut_wav  # noqa: E402
from synthetic_video import make_video, mouth_area  # noqa: E402

PRESETS = Path(__file__).with_name("presets_test.toml")
MODEL = "tiny-face"
KEPT = {"talk", "port", "f30"}
SKIPPED = {  # video -> what its reason says
    "noaudio": "no sound track",
    "noface": "no face in frame 0",
    "two": "2 faces in frame 0",
    "short": "too short: 38 frames",
    "trunc": "differ by more than|truncated|corrupt",
    "badcap": "not UTF-8",
    "nocap": "no caption",
    "garbage": "cannot read video",
}


def hallo3(*args, env=None, cwd=None) -> subprocess.CompletedProcess:
    environment = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "hallo3_cli", *map(str, args)], capture_output=True, text=True,
                          env=environment, cwd=cwd, timeout=600)


@pytest.fixture(scope="module")
def face_preset(tmp_path_factory):
    """tiny-test (64×96) with fake face models: a SCRFD with a static 160×160 input (cheap letterboxing) whose
    keypoints are mediapipe's canonical face centred on the red cell it finds, and a 512-d ArcFace."""
    pytest.importorskip("onnx")
    from test_face import make_matmul_recognizer, make_scrfd

    from hallo3_cli import face

    root = tmp_path_factory.mktemp("face_preset")
    models = root / "face_models"
    models.mkdir()
    kps = (face.CANONICAL_KEYPOINTS[:, :2] / 8 + 0.5).ravel()  # a frontal face centred in its cell: the pose fit is exact
    make_scrfd(models / face.DETECTOR_FILE, static=(160, 160), kps_offsets=kps)
    make_matmul_recognizer(models / face.RECOGNIZER_FILE, np.random.default_rng(0).normal(size=(588, 512)))
    table = PRESETS.read_text().replace("[tiny-test", f"[{MODEL}")
    table = table.replace('description = "tiny-random at 64x96', f'face_models = "{models}"\ndescription = "tiny-random at 64x96', 1)
    (root / "presets.toml").write_text(table)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HALLO3_PRESETS", f"{PRESETS}{os.pathsep}{root / 'presets.toml'}")
        yield MODEL


@pytest.fixture(scope="module")
def speech(tmp_path_factory, media_dir) -> Path:
    return cut_wav(media_dir / "speech_0001.wav", tmp_path_factory.mktemp("speech") / "speech.wav", 3.0)


@pytest.fixture(scope="module")
def raw(tmp_path_factory, media_dir, speech) -> Path:
    """A folder in the release's layout (videos/, caption/): three good videos (a 160×160 talking head, a 128×192
    portrait-orientation one, a 30 fps mkv) and the bad ones of :data:`SKIPPED`."""
    root = tmp_path_factory.mktemp("raw")
    videos, captions = root / "videos", root / "caption"
    videos.mkdir()
    captions.mkdir()
    make_video(videos / "talk.mp4", media_dir / "face_0001.jpg", speech, seconds=2.4)
    make_video(videos / "port.mp4", media_dir / "face_0003.jpg", speech, seconds=2.4, width=128, height=192)
    make_video(videos / "f30.mkv", media_dir / "face_0008.jpg", speech, seconds=2.4, fps=30)
    make_video(videos / "noaudio.mp4", media_dir / "face_0001.jpg", speech, seconds=2.4, audio=False)
    make_video(videos / "noface.mp4", media_dir / "face_0001.jpg", speech, seconds=2.4, faces=0)
    make_video(videos / "two.mp4", media_dir / "face_0001.jpg", speech, seconds=2.4, faces=2)
    make_video(videos / "short.mp4", media_dir / "face_0001.jpg", speech, seconds=1.5)
    data = (videos / "talk.mp4").read_bytes()
    (videos / "trunc.mp4").write_bytes(data[: len(data) // 2])
    (videos / "garbage.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    shutil.copy(videos / "talk.mp4", videos / "badcap.mp4")
    shutil.copy(videos / "talk.mp4", videos / "nocap.mp4")
    for name in ("talk", "port", "f30", "noaudio", "noface", "two", "short", "trunc", "garbage"):
        (captions / f"{name}.txt").write_text(f"A person ({name}) talking to the camera.\n")
    (captions / "badcap.txt").write_bytes(b"A caption in Latin-1: caf\xe9\n")
    (root / "notes.md").write_text("not a video, ignored")
    return root


@pytest.fixture(scope="module")
def prepared(face_preset, raw, tmp_path_factory):
    from hallo3_cli.training import prepare_dataset

    result = prepare_dataset([raw], tmp_path_factory.mktemp("data") / "dataset", model=face_preset, progress=False)
    return result


def source_frames(video: Path) -> np.ndarray:
    from hallo3_cli.evaluate.frames import iter_frames

    return np.stack(list(iter_frames(video)))


def squashed(rgb: np.ndarray, height: int = 64, width: int = 96) -> np.ndarray:
    """A source frame as training stores it, computed here through image_io's public framing."""
    from hallo3_cli.image_io import frame_image, to_uint8

    side = min(height, width)
    left = (width - side) // 2
    framed, _ = frame_image(torch.from_numpy(rgb).permute(2, 0, 1).float() / 255, height, width, framing="squash")
    assert (framed[:, :, :left] == -1).all() and (framed[:, :, left + side:] == -1).all()  # zero padding
    return to_uint8(framed[:, :, left:left + side])


# ---------------------------------------------------------------------------------------------
# what is kept, what is skipped


def test_kept_and_skipped_with_reasons(prepared, raw):
    import re

    outcomes = {o.id: o for o in prepared.outcomes}
    assert {o.id for o in prepared.kept} == KEPT
    assert set(outcomes) == KEPT | set(SKIPPED)  # notes.md is not a video
    for name, pattern in SKIPPED.items():
        assert re.search(pattern, outcomes[name].reason), (name, outcomes[name].reason)
    report = json.loads(prepared.report.read_text())
    assert {entry["id"]: entry["reason"] for entry in report["skipped"]} == {n: outcomes[n].reason for n in SKIPPED}
    manifest = json.loads(prepared.manifest.read_text())
    assert manifest["model"] == MODEL and (manifest["height"], manifest["width"], manifest["fps"]) == (64, 96, 25)
    entries = {v["id"]: v for v in manifest["videos"]}
    assert set(entries) == KEPT
    for name, entry in entries.items():
        assert entry["num_frames"] == min(entry["video_frames"], entry["audio_frames"])
        assert abs(entry["num_frames"] - 60) <= 1 and entry["frames_without_face"] == 0
        assert entry["clips"] == {"stage1": entry["num_frames"] - 49, "stage2": entry["num_frames"] - 54}
        assert entry["caption"] == f"A person ({name}) talking to the camera."
        assert all((prepared.root / path).is_file() for path in entry["files"].values())
    assert manifest["totals"]["videos"] == 3
    # skipped videos leave no stage files, and nothing is left half-written
    assert sorted(p.name for p in (prepared.root / "items").iterdir()) == sorted(KEPT)
    assert not [p for p in prepared.root.rglob("*") if ".tmp" in p.name or p.name.endswith(".lock")]


def test_stage_files_hold_the_video(prepared, raw, face_preset):
    """Every file loads with full validation; the frames are the source's frames squashed, the face embedding
    is the detector's first face, the mask the union of the per-frame boxes, the audio one row per frame."""
    from hallo3_cli import stages
    from hallo3_cli.audio_io import load_audio
    from hallo3_cli.face import FaceAnalyzer, face_mask
    from hallo3_cli.image_io import decode_frame, encode_frame
    from hallo3_cli.loading import load_face_analyzer
    from hallo3_cli.presets import get_preset
    from hallo3_cli.training.dataset import item_file, read_frames

    analyzer: FaceAnalyzer = load_face_analyzer(get_preset(face_preset))
    for name, suffix in (("talk", "mp4"), ("port", "mp4")):
        video = raw / "videos" / f"{name}.{suffix}"
        files = {role: stages.load_stage(item_file(prepared.root, name, role), kind, model=face_preset)
                 for role, kind in (("frames", stages.FRAMES), ("face", stages.FACE), ("audio", stages.AUDIO),
                                    ("prompt", stages.PROMPT))}
        frames, face, audio, prompt = (files[k] for k in ("frames", "face", "audio", "prompt"))
        assert (frames.meta["height"], frames.meta["width"], frames.meta["codec"]) == (64, 64, "jpeg")
        assert len({f.meta["source_sha256"] for f in (frames, face, audio)}) == 1
        source = source_frames(video)
        assert frames.meta["num_frames"] == len(source) == 60
        assert (frames.meta["source_width"], frames.meta["source_height"]) == (source.shape[2], source.shape[1])
        stored = read_frames(item_file(prepared.root, name, "frames"), 0, 60)
        # the same pixels through the same JPEG encoder: what is left is the decoders' rounding, not the codec's loss
        expected = np.stack([decode_frame(encode_frame(squashed(f), "jpeg", 95)) for f in source])
        error = np.abs(stored.astype(int) - expected)
        assert error.mean() < 0.05 and error.max() <= 2
        # the face: first frame's embedding, union of the per-frame boxes (ratio 1.0), squashed like the frames
        first = analyzer.analyze(source[0], ratio=1.0)
        assert face.meta["embedding_frame"] == 0 and face.meta["frames_without_face"] == 0
        assert torch.allclose(face["face_embedding"], torch.from_numpy(first.embedding), rtol=1e-5, atol=1e-5)
        boxes = np.stack([analyzer.analyze(f, ratio=1.0, embed=False).box for f in source])
        assert np.array_equal(face["boxes"].numpy(), boxes.astype(np.float32)) and face["found"].all()
        union = [boxes[:, 0].min(), boxes[:, 1].min(), boxes[:, 2].max(), boxes[:, 3].max()]
        assert face["union_box"].tolist() == union
        height, width = source.shape[1:3]
        assert 0 < (union[2] - union[0]) * (union[3] - union[1]) < 0.6 * height * width  # a face, not the frame
        mask = squashed(np.repeat(face_mask(union, height, width)[..., None] * 255, 3, 2).astype(np.uint8))[..., 0]
        assert np.abs(face["mask"].numpy().astype(int) - mask).max() <= 1
        # the audio: the video's sound track, one row per 25 fps frame and NOT padded to whole clips (60 rows)
        samples = len(load_audio(video))
        assert audio["features"].shape[0] == audio.meta["num_frames"] == -(-samples * 25 // 16000) == 60
        assert audio.params["pad_to_clips"] is False and audio.params["separate_vocals"] is False
        assert prompt.meta["prompt"] == f"A person ({name}) talking to the camera."
        assert prompt["prompt_embeds"].shape == (226, 32)


def test_frames_follow_the_speech(prepared, raw):
    """Stored frame i shows the mouth at time i/25: its opening follows the speech's loudness in audio rows
    i*640 .. (i+1)*640 best at lag 0 (also for the 30 fps source, resampled by holding frames)."""
    from hallo3_cli.audio_io import load_audio
    from hallo3_cli.training.dataset import item_file, read_frames

    for name, suffix, floor in (("talk", "mp4", 0.95), ("port", "mp4", 0.95), ("f30", "mkv", 0.8)):
        n = json.loads(prepared.manifest.read_text())["videos"]
        n = next(v["num_frames"] for v in n if v["id"] == name)
        area = mouth_area(read_frames(item_file(prepared.root, name, "frames"), 0, n)).astype(float)
        wave = load_audio(raw / "videos" / f"{name}.{suffix}")
        loudness = np.array([np.sqrt(np.mean(wave[i * 640:(i + 1) * 640] ** 2)) for i in range(n)])

        def correlation(lag):
            a = area[max(0, lag):n + min(0, lag)]
            b = loudness[max(0, -lag):n - max(0, lag)]
            return np.corrcoef(a, b)[0, 1]

        assert correlation(0) > floor, (name, correlation(0))
        assert correlation(0) > max(correlation(lag) for lag in (-3, -2, 2, 3)) + 0.3, name


def test_thirty_fps_is_resampled_by_holding_frames(face_preset, raw, tmp_path):
    """A 30 fps video becomes 25 fps: stored frame k (lossless PNG here) is the source frame on screen at k/25."""
    import av

    from hallo3_cli.training import prepare_dataset
    from hallo3_cli.training.dataset import item_file, read_frames

    result = prepare_dataset([raw / "videos" / "f30.mkv"], tmp_path / "data", model=face_preset, codec="png",
                             progress=False)
    assert [o.id for o in result.kept] == ["f30"]
    with av.open(str(raw / "videos" / "f30.mkv")) as container:
        native = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    assert len(native) == 72
    stored = read_frames(item_file(tmp_path / "data", "f30", "frames"), 0, result.kept[0].num_frames)
    for k in range(0, len(stored), 7):
        held = native[min(k * 30 // 25, 71)]
        assert np.array_equal(stored[k], squashed(held)), k  # PNG: exactly the squashed source frame


def test_allow_missing_faces(face_preset, media_dir, speech, tmp_path):
    """A face that leaves the picture for some frames drops the video (as the release), unless
    --allow-missing-faces: then those frames are marked and the mask is the union over the others."""
    from hallo3_cli import stages
    from hallo3_cli.training import prepare_dataset
    from hallo3_cli.training.dataset import item_file

    video = make_video(tmp_path / "away.mp4", media_dir / "face_0001.jpg", speech, seconds=2.4, hidden=range(3, 9))
    result = prepare_dataset([video], tmp_path / "strict", model=face_preset, prompt="Someone talks.", progress=False)
    assert not result.kept and "no face in frame 3 (0.12 s)" in result.skipped[0].reason
    assert not (tmp_path / "strict" / "items" / "away").exists()
    result = prepare_dataset([video], tmp_path / "lenient", model=face_preset, prompt="Someone talks.",
                             allow_missing_faces=True, progress=False)
    assert [o.id for o in result.kept] == ["away"]
    face = stages.load_stage(item_file(tmp_path / "lenient", "away", "face"), stages.FACE)
    found = face["found"].numpy()
    assert face.meta["frames_without_face"] == 6 and not found[3:9].any() and found[:3].all() and found[9:].all()
    assert (face["boxes"][3:9] == 0).all() and (face["boxes"][:3] > 0).any()
    manifest = json.loads((tmp_path / "lenient" / "manifest.json").read_text())
    assert manifest["videos"][0]["frames_without_face"] == 6 and manifest["videos"][0]["caption"] == "Someone talks."


def test_random_preset_without_face_models_runs_offline(raw, tmp_path, monkeypatch):
    """tiny-test has no face models: a video is kept with a zero embedding and the whole frame as its mask."""
    from hallo3_cli import stages
    from hallo3_cli.training import prepare_dataset
    from hallo3_cli.training.dataset import item_file

    monkeypatch.setenv("HALLO3_PRESETS", str(PRESETS))
    result = prepare_dataset([raw / "videos" / "noface.mp4"], tmp_path / "data", model="tiny-test", progress=False)
    assert [o.id for o in result.kept] == ["noface"]
    face = stages.load_stage(item_file(tmp_path / "data", "noface", "face"), stages.FACE)
    assert not face["face_embedding"].any() and (face["mask"] == 255).all() and not face["found"].any()


# ---------------------------------------------------------------------------------------------
# Hallo3Dataset


@pytest.mark.parametrize("stage", [1, 2])
def test_samples_shapes_ranges_and_determinism(prepared, face_preset, stage):
    from hallo3_cli.training import Hallo3Dataset, start_range

    data = Hallo3Dataset(prepared.root, stage, seed=3, length=300)
    assert len(data) == 300 and [v.id for v in data.videos] == sorted(KEPT)
    sample = data[4]
    expected = {"frames": ((49, 3, 64, 96), torch.float32), "ref_image": ((3, 64, 96), torch.float32),
                "masked_ref": ((3, 64, 96), torch.float32), "face_embedding": ((512,), torch.float32),
                "prompt_embeds": ((226, 32), torch.float32)}
    if stage == 2:
        expected.update(audio=((49, 5, 2, 32), torch.float32), audio_dropped=((), torch.bool))
    for key, (shape, dtype) in expected.items():
        assert (tuple(sample[key].shape), sample[key].dtype) == (shape, dtype), key
    assert set(sample) == set(expected) | {"caption", "video_id", "video_index", "start", "ref_index", "sample_index", "fps"}
    assert sample["frames"].min() >= -1 and sample["frames"].max() <= 1
    assert (sample["frames"][:, :, :, :16] == -1).all() and (sample["frames"][:, :, :, 80:] == -1).all()  # padding
    # the draws: the stage's start range, the reference from the whole video; every start is reached
    starts, refs = {}, {}
    for index in range(300):
        video, start, ref, _ = data.draw(index)
        assert start in start_range(stage, video.num_frames)
        starts.setdefault(video.id, set()).add(start)
        refs.setdefault(video.id, set()).add(ref)
    for video in data.videos:
        assert starts[video.id] == set(start_range(stage, video.num_frames))
        assert max(refs[video.id]) > max(start_range(stage, video.num_frames)) + 48  # beyond any clip
        assert min(refs[video.id]) < 10
    # deterministic for a seed and an index, whatever object or order; another seed draws otherwise
    again = Hallo3Dataset(prepared.root, stage, seed=3, length=300)
    for index in (4, 0, 299):
        a, b = data[index], again[index]
        assert all(torch.equal(a[k], b[k]) for k in expected) and a["start"] == b["start"]
    other = Hallo3Dataset(prepared.root, stage, seed=4, length=300)
    assert [other.draw(i)[1:3] for i in range(20)] != [data.draw(i)[1:3] for i in range(20)]
    batch = next(iter(torch.utils.data.DataLoader(data, batch_size=2)))
    assert batch["frames"].shape == (2, 49, 3, 64, 96) and len(batch["caption"]) == 2


def test_sample_alignment(prepared, face_preset):
    """Frames are the stored frames start..start+48; the reference is the stored frame ref_index; the masked
    reference is it inside the union mask and -1 outside; audio row i <-> frame i, rows i-2..i+2 unclamped."""
    from hallo3_cli import stages
    from hallo3_cli.training import Hallo3Dataset
    from hallo3_cli.training.dataset import item_file, read_frames

    data = Hallo3Dataset(prepared.root, 2, seed=0, length=12, audio_drop_rate=0.0)
    for index in range(0, 12, 5):
        sample = data[index]
        video_id, start, ref = sample["video_id"], sample["start"], sample["ref_index"]
        frames = read_frames(item_file(prepared.root, video_id, "frames"), start, 49)
        content = (torch.from_numpy(frames).permute(0, 3, 1, 2).float() - 127.5) / 127.5
        assert torch.equal(sample["frames"][:, :, :, 16:80], content)
        reference = torch.from_numpy(read_frames(item_file(prepared.root, video_id, "frames"), ref, 1)[0]).permute(2, 0, 1)
        assert torch.equal(sample["ref_image"][:, :, 16:80], (reference.float() - 127.5) / 127.5)
        face = stages.load_stage(item_file(prepared.root, video_id, "face"), stages.FACE)
        inside = face["mask"] == 255
        outside = face["mask"] == 0
        assert inside.any() and outside.any()
        masked = sample["masked_ref"][:, :, 16:80]
        assert torch.equal(masked[:, inside], sample["ref_image"][:, :, 16:80][:, inside])
        assert (masked[:, outside] == -1).all()
        features = stages.load_stage(item_file(prepared.root, video_id, "audio"), stages.AUDIO)["features"]
        audio = sample["audio"]
        for j in (0, 24, 48):
            for w in range(5):
                assert torch.equal(audio[j, w], features[start + j + w - 2])
        assert start - 2 >= 1 and start + 48 + 2 <= features.shape[0] - 2  # never clamped, as the release


def test_stage_two_audio_dropout_and_length(prepared, face_preset, tmp_path):
    from hallo3_cli.errors import InputError
    from hallo3_cli.training import Hallo3Dataset

    data = Hallo3Dataset(prepared.root, 2, seed=1, length=400)
    dropped = [data.draw(i)[3] for i in range(400)]
    assert 5 <= sum(dropped) <= 40  # p = 0.05
    index = dropped.index(True)
    assert data[index]["audio_dropped"] and not data[index]["audio"].any()
    assert not Hallo3Dataset(prepared.root, 2, seed=1, length=400, audio_drop_rate=0)[index]["audio_dropped"]
    # a dataset whose videos are too short for stage 2 (52 frames) says so
    copy = tmp_path / "short"
    shutil.copytree(prepared.root, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    for video in manifest["videos"]:
        video["num_frames"] = 52
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert len(Hallo3Dataset(copy, 1)) == 3
    with pytest.raises(InputError, match="no video is long enough for stage 2 .it needs 55 frames"):
        Hallo3Dataset(copy, 2)


# ---------------------------------------------------------------------------------------------
# resume and --check


def test_rerun_redoes_nothing_and_finishes_what_is_missing(prepared, raw, face_preset, tmp_path):
    from hallo3_cli.training import prepare_dataset

    data = tmp_path / "dataset"
    shutil.copytree(prepared.root, data)
    stamps = {p: p.stat().st_mtime_ns for p in data.rglob("*.safetensors")}
    result = prepare_dataset([raw], data, model=face_preset, progress=False)
    assert {o.id for o in result.kept} == KEPT and not any(o.fresh for o in result.outcomes)
    assert {p: p.stat().st_mtime_ns for p in data.rglob("*.safetensors")} == stamps
    assert json.loads(result.manifest.read_text()) == json.loads(prepared.manifest.read_text())
    # a lost audio file, a truncated frames file and a changed caption: only those are redone
    (data / "items" / "talk" / "audio.safetensors").unlink()
    frames = data / "items" / "port" / "frames.safetensors"
    frames.write_bytes(frames.read_bytes()[:-100])
    caption, badcap = raw / "caption" / "f30.txt", raw / "caption" / "badcap.txt"
    caption.write_text("A new caption.")
    try:
        result = prepare_dataset([raw], data, model=face_preset, progress=False)
        assert {o.id for o in result.kept if o.fresh} == KEPT
        changed = {p.relative_to(data).as_posix() for p in data.rglob("*.safetensors")
                   if stamps.get(p) != p.stat().st_mtime_ns}
        assert changed == {"items/talk/audio.safetensors", "items/port/frames.safetensors",
                           "items/port/face.safetensors", "items/f30/prompt.safetensors"}
        entry = next(v for v in json.loads(result.manifest.read_text())["videos"] if v["id"] == "f30")
        assert entry["caption"] == "A new caption."
        # a skipped video is retried once what made it fail changes (here: its caption becomes readable)
        badcap.write_text("Now readable.")
        result = prepare_dataset([raw], data, model=face_preset, progress=False)
        assert {o.id for o in result.outcomes if o.fresh} == {"badcap"} and "badcap" in {o.id for o in result.kept}
        assert not (data / "skipped" / "badcap.json").exists()
    finally:
        caption.write_text("A person (f30) talking to the camera.\n")
        badcap.write_bytes(b"A caption in Latin-1: caf\xe9\n")


def test_check_finds_damage(prepared, tmp_path):
    from hallo3_cli.training import check_dataset

    data = tmp_path / "dataset"
    shutil.copytree(prepared.root, data)
    assert check_dataset(data, progress=False).problems == []
    assert check_dataset(data, progress=False).files == 12
    # NaN in the features, a frame that no longer decodes, a manifest that lies, a stray unfinished folder
    from safetensors.torch import load_file, save_file

    from hallo3_cli import stages

    audio = data / "items" / "talk" / "audio.safetensors"
    tensors, header = load_file(str(audio)), stages.read_header(audio)
    tensors["features"][5, 0, 0] = float("nan")
    save_file(tensors, str(audio), metadata=header)
    frames = data / "items" / "port" / "frames.safetensors"
    tensors, header = load_file(str(frames)), stages.read_header(frames)
    start = int(tensors["offsets"][7])
    tensors["data"][start:start + 8] = 0  # the JPEG's start-of-image marker and header gone
    save_file(tensors, str(frames), metadata=header)
    manifest = json.loads((data / "manifest.json").read_text())
    next(v for v in manifest["videos"] if v["id"] == "f30")["num_frames"] = 70
    (data / "manifest.json").write_text(json.dumps(manifest))
    (data / "items" / "stray").mkdir()
    problems = check_dataset(data, progress=False).problems
    text = "\n".join(f"{where}: {what}" for where, what in problems)
    assert "talk: " in text and "NaN" in text
    assert "port: " in text and "frame 7" in text
    assert "f30: manifest says 70 frames" in text
    assert "stray: " in text and "not in the manifest" in text
    assert len(problems) == 4, text


def test_cli_prepare_check_and_exit_codes(prepared, raw, face_preset, tmp_path):
    """Through the command line: the manifest path on stdout, progress and the summary on stderr, and exit 3 with
    the reasons when no video is kept (--check through the CLI: test_two_processes_share_one_folder)."""
    from hallo3_cli.errors import InputError
    from hallo3_cli.training import check_dataset

    again = hallo3("prepare", raw, "-o", prepared.root, "--model", face_preset)
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == str(prepared.manifest)
    assert "3 of 11 videos kept (0 prepared by this process, 3 found done), 8 skipped" in again.stderr
    assert "video 11/11" in again.stderr and "ETA" in again.stderr
    none = hallo3("prepare", raw / "videos" / "noaudio.mp4", raw / "videos" / "short.mp4", "-o", tmp_path / "none",
                  "--model", face_preset, "--prompt", "Hello.", "-q")
    assert none.returncode == 3 and none.stdout == "" and "Traceback" not in none.stderr
    assert "noaudio  has no sound track" in none.stderr and "short    too short" in none.stderr
    assert none.stderr.strip().splitlines()[-1].startswith("hallo3: error: ") and "no video was kept" in none.stderr
    report = json.loads((tmp_path / "none" / "report.json").read_text())
    assert report["kept"] == 0 and len(report["skipped"]) == 2
    with pytest.raises(InputError, match="no manifest.json"):
        check_dataset(raw)


def test_sources_lists_and_ids(raw, tmp_path):
    from hallo3_cli.errors import InputError
    from hallo3_cli.training import find_sources

    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(raw / "videos" / "talk.mp4", other / "talk.mp4")
    (other / "talk.txt").write_text("beside")
    listing = tmp_path / "list.txt"
    listing.write_text(f"# videos\n{raw / 'videos' / 'talk.mp4'}\nother/talk.mp4\nmissing.mp4\n\n")
    sources = find_sources([listing])
    assert [s.video.name for s in sources] == ["talk.mp4", "talk.mp4", "missing.mp4"]
    assert len({s.id for s in sources}) == 3 and all(s.id.startswith("talk-") for s in sources[:2])
    assert sources[0].caption == raw / "caption" / "talk.txt" and sources[1].caption == other / "talk.txt"
    assert sources[2].problem.startswith("no such file (line 4")
    assert [s.id for s in find_sources([other])] == ["talk"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no videos"):
        find_sources([tmp_path / "empty"])
    with pytest.raises(InputError, match="no such file or folder"):
        find_sources([tmp_path / "nothing"])


@pytest.mark.slow
def test_two_processes_share_one_folder(face_preset, raw, tmp_path):
    """Two plain invocations at once on one folder (as `xargs -P 2` would start them), then two torchrun-style
    ranks: each video is prepared by exactly one process, both finish with the whole manifest, and the dataset
    verifies."""
    import re

    from hallo3_cli.training import check_dataset

    sources = tmp_path / "videos"
    sources.mkdir()
    for name in ("talk.mp4", "port.mp4", "f30.mkv"):
        shutil.copy(raw / "videos" / name, sources / name)
    for env_a, env_b, folder in (({}, {}, "xargs"), ({"RANK": "0", "WORLD_SIZE": "2"}, {"RANK": "1", "WORLD_SIZE": "2"}, "ranks")):
        calls = [subprocess.Popen([sys.executable, "-m", "hallo3_cli", "prepare", str(sources), "-o", str(tmp_path / folder),
                                   "--model", face_preset, "--prompt", "A person talking."], env={**os.environ, **env},
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for env in (env_a, env_b)]
        results = [call.communicate(timeout=600) + (call.returncode,) for call in calls]
        assert all(code == 0 for _, _, code in results), [err for _, err, _ in results]
        # the progress line of a video this process prepared itself ends "kept (N frames) (", not ", already done"
        computed = [name for _, err, _ in results for name in re.findall(r"video \d+/3 (\S+): kept \(\d+ frames\) \(", err)]
        assert sorted(computed) == ["f30", "port", "talk"], [err for _, err, _ in results]
        for out, _, _ in results:
            assert out.strip() == str(tmp_path / folder / "manifest.json")
        manifest = json.loads((tmp_path / folder / "manifest.json").read_text())
        assert sorted(v["id"] for v in manifest["videos"]) == ["f30", "port", "talk"]
        if folder == "xargs":
            check = hallo3("prepare", "--check", tmp_path / folder, "-q")  # the path on stdout, nothing wrong
            assert check.returncode == 0 and check.stdout.strip() == str(tmp_path / folder), check.stderr
        else:
            assert check_dataset(tmp_path / folder, progress=False).problems == []
        assert not [p for p in (tmp_path / folder).rglob("*") if ".tmp" in p.name or p.name.endswith(".lock")]


def test_webm_with_the_voice_isolated_first(face_preset, media_dir, speech, tmp_path, monkeypatch):
    """A VP9/Opus webm is read through PyAV; with separate_vocals the sound track goes through the separator
    (stubbed here: random presets have none) at 44.1 kHz before wav2vec, and the audio file says so."""
    from hallo3_cli import stages, vocals
    from hallo3_cli.training import prepare_dataset
    from hallo3_cli.training.dataset import item_file

    video = make_video(tmp_path / "web.webm", media_dir / "face_0008.jpg", speech, seconds=2.4)
    calls = []

    def separate(mix, model_path, progress=True):
        calls.append((mix.shape, model_path))
        return mix * 0.5

    monkeypatch.setattr(vocals, "find_separator_model", lambda preset: tmp_path / "Kim_Vocal_2.onnx")
    monkeypatch.setattr(vocals, "separate_vocals", separate)
    result = prepare_dataset([video], tmp_path / "data", model=face_preset, prompt="Someone talks.",
                             separate_vocals=True, progress=False)
    assert [(o.id, o.num_frames) for o in result.kept] == [("web", 60)]
    assert calls == [((1, round(2.4 * 44100)), tmp_path / "Kim_Vocal_2.onnx")]  # the file's one channel, 44.1 kHz
    audio = stages.load_stage(item_file(tmp_path / "data", "web", "audio"), stages.AUDIO)
    assert audio.params["separate_vocals"] is True and audio["features"].shape[0] == 60


def test_training_framing_and_frame_codecs():
    """framing="squash" resizes any aspect to the square (bicubic, antialiased) and pads it; frames are stored
    as JPEG (close) or PNG (exact) and anything else is refused."""
    import torch.nn.functional as F

    from hallo3_cli.image_io import decode_frame, encode_frame, frame_geometry, frame_image, to_uint8

    rng = np.random.default_rng(0)
    wide = torch.from_numpy(rng.random((3, 90, 200), np.float32))
    framed, framing = frame_image(wide, 64, 96, framing="squash")
    assert framing == "squash" and framed.shape == (3, 64, 96)
    direct = F.interpolate(wide[None], size=(64, 64), mode="bicubic", align_corners=False, antialias=True)[0] * 2 - 1
    assert torch.allclose(framed[:, :, 16:80], direct, atol=1e-6) and (framed[:, :, :16] == -1).all()
    assert frame_image(wide, 64, 96)[1] == "crop"  # inference's rule is unchanged
    assert frame_geometry(200, 90, 64, 96, "squash").resized_width == 64
    picture = to_uint8(framed[:, :, 16:80])
    assert picture.dtype == np.uint8 and picture.shape == (64, 64, 3)
    assert np.array_equal(decode_frame(encode_frame(picture, "png")), picture)
    jpeg = decode_frame(np.frombuffer(encode_frame(picture, "jpeg", 95), np.uint8))
    assert np.abs(jpeg.astype(int) - picture).mean() < 8
    with pytest.raises(ValueError, match="undecodable frame"):
        decode_frame(b"not a picture")
    with pytest.raises(ValueError, match="unknown frame codec"):
        encode_frame(picture, "gif")


def test_variable_frame_rate_is_resampled_by_time(tmp_path):
    """A variable frame rate that averages 25 fps (20 frames of 20 ms, then 20 of 60 ms) is resampled by the
    frames' timestamps, as prepare reads videos: each 1/25 s gets the frame on screen then."""
    import av

    from hallo3_cli.evaluate.frames import iter_frames

    path = tmp_path / "vfr.mkv"
    shows = np.cumsum([0] + [20] * 20 + [60] * 19)  # ms at which each frame appears
    colours = [np.full((32, 32, 3), 6 * k, np.uint8) for k in range(40)]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25, options={"qp": "0", "preset": "ultrafast"})
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv444p"
        stream.codec_context.time_base = Fraction(1, 1000)
        for show, colour in zip(shows, colours):
            frame = av.VideoFrame.from_ndarray(colour, format="rgb24")
            frame.pts, frame.time_base = int(show), Fraction(1, 1000)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    resampled = np.stack([f[0, 0, 0] for f in iter_frames(path)]).astype(int)
    expected = [6 * (np.searchsorted(shows, 40 * k, side="right") - 1) for k in range(len(resampled))]
    assert len(resampled) == 40 and np.abs(resampled - expected).max() <= 2  # lossless up to YUV rounding
    assert expected[:12] == [6 * k for k in (0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 20)]
