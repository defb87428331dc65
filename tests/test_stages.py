"""Stage files: round trips, one-line validation errors naming the file, atomic writes, loader fuzzing."""

from __future__ import annotations

import json
import re
import struct

import pytest
import torch
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from hallo3_cli import stages
from hallo3_cli.errors import InputError, OutputError, StageFileError

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(autouse=True)
def any_geometry(monkeypatch):
    """The small stages here match no preset's geometry or weights (tests/test_safety.py checks those)."""
    monkeypatch.setattr(stages, "_check_geometry", lambda stage: None)
    monkeypatch.setattr(stages, "_check_weights", lambda stage: None)


# ---------------------------------------------------------------------------------------------
# small valid stages of every kind


def common_meta(**overrides) -> dict:
    meta = {
        "model": "tiny-random",
        "weights": "f" * 16,
        "params": {"seed": 42, "cfg": 3.5, "nested": {"steps": [1, 2]}, "name": "ünïcode"},
        "source_sha256": "0123abcd" * 8,
    }
    meta.update(overrides)
    return meta


def valid_stage(kind: stages.StageKind, seed: int = 0) -> tuple[dict, dict]:
    """Small tensors and metadata that satisfy ``kind``'s schema."""
    g = torch.Generator().manual_seed(seed)
    randn = lambda *shape, dtype=torch.float32: torch.randn(*shape, generator=g).to(dtype)  # noqa: E731
    if kind is stages.AUDIO:
        tensors = {"features": randn(10, 2, 4)}
        meta = {"fps": 25, "num_frames": 8, "clip_length": 5, "sample_rate": 16000}
    elif kind is stages.REFERENCE:
        tensors = {
            "image": randn(3, 16, 24).clamp(-1, 1),
            "ref_latent": randn(16, 2, 3),
            "face_embedding": randn(512),
            "face_box": torch.tensor([1, 2, 20, 14], dtype=torch.int32),
            "prompt_embeds": randn(6, 8, dtype=torch.bfloat16),
            "ref_bank": randn(2, 6, 8, dtype=torch.float16),
        }
        meta = {"framing": "pad", "source_width": 640, "source_height": 480, "face_found": True, "prompt": "a man talks, «quoted» \"x\""}
    elif kind is stages.CLIP:
        tensors = {"latents": randn(4, 16, 2, 3)}
        meta = {"index": 3, "render_key": "abc123"}
    elif kind is stages.CLIPS:
        tensors = {"latents": randn(2, 4, 16, 2, 3)}
        meta = {"num_frames": 90, "fps": 25, "clip_length": 49, "motion_frames": 2, "framing": "crop", "height": 16, "width": 24}
    elif kind is stages.FRAMES:
        data = torch.randint(0, 256, (30,), generator=g).to(torch.uint8)
        tensors = {"data": data, "offsets": torch.tensor([0, 9, 20, 30], dtype=torch.int64)}
        meta = {"num_frames": 3, "fps": 25, "height": 16, "width": 16, "codec": "jpeg", "source_width": 640,
                "source_height": 360}
    elif kind is stages.FACE:
        tensors = {
            "face_embedding": randn(512),
            "mask": torch.randint(0, 256, (16, 16), generator=g).to(torch.uint8),
            "union_box": torch.tensor([1, 2, 20, 14], dtype=torch.int32),
            "boxes": randn(3, 4).abs(),
            "found": torch.tensor([True, False, True]),
        }
        meta = {"num_frames": 3, "frames_without_face": 1, "embedding_frame": 0, "source_width": 640,
                "source_height": 360}
    elif kind is stages.PROMPT:
        tensors = {"prompt_embeds": randn(6, 8, dtype=torch.bfloat16)}
        meta = {"prompt": "a woman talks, «quoted»"}
    else:  # pragma: no cover - a new kind must be added here
        raise AssertionError(f"no test data for {kind.format}")
    return tensors, common_meta(**meta)


def write_valid(path, kind, seed: int = 0):
    tensors, meta = valid_stage(kind, seed)
    stages.save_stage(path, kind, tensors, meta)
    return tensors, meta


def rewrite(path, *, meta=None, drop_meta=(), tensors=None, drop_tensors=()):
    """Rewrite a stage file with safetensors directly, bypassing ``save_stage``'s validation."""
    header = dict(stages.read_header(path))
    header.update(meta or {})
    for key in drop_meta:
        header.pop(key)
    data = dict(load_file(str(path)))
    data.update(tensors or {})
    for name in drop_tensors:
        data.pop(name)
    save_file(data, str(path), metadata=header)


def write_raw(path, header: bytes, data: bytes = b"") -> None:
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)


def expect_error(path, kind, *needles, error=StageFileError, **kwargs) -> str:
    """Load must fail with a one-line ``error`` that names ``path`` and contains every needle."""
    with pytest.raises(error) as info:
        stages.load_stage(path, kind, **kwargs)
    message = str(info.value)
    assert len(message.splitlines()) == 1, message
    assert str(path) in message
    assert info.value.path == path
    for needle in needles:
        assert needle in message, (needle, message)
    return message


ALL_KINDS = list(stages.KINDS.values())


@pytest.fixture
def audio_file(tmp_path):
    path = tmp_path / "speech.audio.safetensors"
    write_valid(path, stages.AUDIO)
    return path


# ---------------------------------------------------------------------------------------------
# round trips


def test_kinds_registry_is_complete():
    assert set(stages.KINDS) == {"hallo3.audio", "hallo3.reference", "hallo3.clip", "hallo3.clips", "hallo3.frames",
                                 "hallo3.face", "hallo3.prompt"}
    for fmt, kind in stages.KINDS.items():
        assert kind.format == fmt and kind.version >= 1 and kind.description


@pytest.mark.parametrize("kind", ALL_KINDS, ids=lambda k: k.format)
def test_round_trip(tmp_path, kind):
    path = tmp_path / f"{kind.format}.safetensors"
    tensors, meta = valid_stage(kind, seed=7)
    assert stages.save_stage(path, kind, tensors, meta) == path
    stage = stages.load_stage(path, kind, model="tiny-random", weights=meta["weights"])

    assert stage.kind is kind and stage.path == path
    assert set(stage.tensors) == set(tensors)
    for name, tensor in tensors.items():
        assert stage[name].dtype == tensor.dtype, name
        assert torch.equal(stage[name], tensor), name
    assert set(stage.meta) == set(meta)
    for key, value in meta.items():
        assert stage.meta[key] == value, key
        assert type(stage.meta[key]) is type(value), key
    assert stage.model == "tiny-random" and stage.weights == meta["weights"] and stage.params == meta["params"]

    header = stages.read_header(path)
    assert header["format"] == kind.format and header["format_version"] == str(kind.version)
    assert all(isinstance(v, str) for v in header.values())


def test_round_trip_bool_false_and_empty_values(tmp_path):
    path = tmp_path / "ref.safetensors"
    tensors, meta = valid_stage(stages.REFERENCE)
    meta.update(face_found=False, prompt="", params={})
    stages.save_stage(path, stages.REFERENCE, tensors, meta)
    stage = stages.load_stage(path, stages.REFERENCE)
    assert stage.meta["face_found"] is False and stage.meta["prompt"] == "" and stage.params == {}


def test_save_makes_non_contiguous_tensors_contiguous(tmp_path):
    path = tmp_path / "a.safetensors"
    tensors, meta = valid_stage(stages.AUDIO)
    features = torch.randn(4, 2, 10).permute(2, 1, 0)  # a non-contiguous view (10, 2, 4)
    stages.save_stage(path, stages.AUDIO, {"features": features}, meta)
    assert torch.equal(stages.load_stage(path, stages.AUDIO)["features"], features)


def test_source_digest():
    a, b, c = ("%064x" % n for n in (1, 2, 3))
    combined = stages.source_digest(a, b)
    assert re.fullmatch(r"[0-9a-f]{64}", combined)
    assert combined == stages.source_digest(a, b)
    assert combined not in (a, b)
    assert stages.source_digest(b, a) != combined  # order matters (audio + reference ≠ reference + audio)
    assert stages.source_digest(a, c) != combined
    assert stages.source_digest(a) != stages.source_digest(a, a)


# ---------------------------------------------------------------------------------------------
# validation: every failure is a one-line StageFileError naming the file


def test_wrong_format_says_what_the_file_is(tmp_path):
    path = tmp_path / "face.ref.safetensors"
    write_valid(path, stages.REFERENCE)
    expect_error(path, stages.AUDIO, "portrait reference", "hallo3.reference", "speech features", "hallo3.audio")
    clips = tmp_path / "clips.safetensors"
    write_valid(clips, stages.CLIPS)
    expect_error(clips, stages.CLIP, "hallo3.clips", "hallo3.clip)")


def test_foreign_safetensors_and_unknown_format(tmp_path):
    plain = tmp_path / "model.safetensors"
    save_file({"weight": torch.zeros(2, 2)}, str(plain))
    expect_error(plain, stages.AUDIO, "not a hallo3 stage file")
    odd = tmp_path / "odd.safetensors"
    save_file({"weight": torch.zeros(2, 2)}, str(odd), metadata={"format": "hallo4.audio", "format_version": "1"})
    expect_error(odd, stages.AUDIO, "hallo4.audio")


@pytest.mark.parametrize("version", ["2", "0", "", "1.0"])
def test_other_format_version(audio_file, version):
    rewrite(audio_file, meta={"format_version": version})
    message = expect_error(audio_file, stages.AUDIO, "version", "not supported", "reads version 1")
    assert version in message.split("not supported")[0]


def test_format_version_with_newline_stays_one_line(audio_file):
    rewrite(audio_file, meta={"format_version": "2\nrm -rf"})
    expect_error(audio_file, stages.AUDIO, "not supported")


def test_missing_format_version(audio_file):
    rewrite(audio_file, drop_meta=["format_version"])
    expect_error(audio_file, stages.AUDIO, "not supported")


@pytest.mark.parametrize("key", ["fps", "num_frames", "model", "weights", "params", "source_sha256"])
def test_missing_metadata_key(audio_file, key):
    rewrite(audio_file, drop_meta=[key])
    expect_error(audio_file, stages.AUDIO, "missing", repr(key))


@pytest.mark.parametrize(
    "kind, key, value, typename",
    [
        (stages.AUDIO, "fps", "twenty-five", "int"),
        (stages.AUDIO, "fps", "25.0", "int"),
        (stages.AUDIO, "num_frames", "", "int"),
        (stages.AUDIO, "params", "[1, 2]", "dict"),
        (stages.AUDIO, "params", "{not json", "dict"),
        (stages.REFERENCE, "face_found", "yes", "bool"),
        (stages.REFERENCE, "face_found", "True", "bool"),
        (stages.CLIPS, "height", "4" * 5000, "int"),
    ],
)
def test_bad_metadata_type(tmp_path, kind, key, value, typename):
    path = tmp_path / "x.safetensors"
    write_valid(path, kind)
    rewrite(path, meta={key: value})
    expect_error(path, kind, repr(key), typename)


def test_wrong_tensor_rank(audio_file):
    rewrite(audio_file, tensors={"features": torch.zeros(10, 8)})
    expect_error(audio_file, stages.AUDIO, "'features'", "2 dimensions", "expected 3")


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool, torch.uint8, torch.float64])
def test_wrong_dtype(audio_file, dtype):
    rewrite(audio_file, tensors={"features": torch.ones(10, 2, 4).to(dtype)})
    expect_error(audio_file, stages.AUDIO, "'features'", "dtype", str(dtype).removeprefix("torch."))


def test_face_box_must_be_integer(tmp_path):
    path = tmp_path / "ref.safetensors"
    write_valid(path, stages.REFERENCE)
    rewrite(path, tensors={"face_box": torch.tensor([1.0, 2.0, 3.0, 4.0])})
    expect_error(path, stages.REFERENCE, "'face_box'", "float32")


def test_missing_tensor(tmp_path):
    path = tmp_path / "ref.safetensors"
    write_valid(path, stages.REFERENCE)
    rewrite(path, drop_tensors=["ref_bank"])
    expect_error(path, stages.REFERENCE, "missing tensor 'ref_bank'")


def test_unexpected_tensor(audio_file):
    rewrite(audio_file, tensors={"secret": torch.zeros(1)})
    expect_error(audio_file, stages.AUDIO, "unexpected", "secret")


@pytest.mark.parametrize(
    "kind, meta, tensors, needle",
    [
        (stages.AUDIO, {}, {"features": torch.zeros(5, 2, 4)}, "num_frames is 8"),
        (stages.AUDIO, {"num_frames": "0", "clip_length": "5"}, {}, "at least 1"),
        (stages.AUDIO, {"fps": "0"}, {}, "positive"),
        (stages.REFERENCE, {}, {"ref_latent": torch.zeros(16, 3, 3)}, "does not match image"),
        (stages.REFERENCE, {}, {"image": torch.zeros(4, 16, 24)}, "3 channels"),
        (stages.REFERENCE, {}, {"face_box": torch.zeros(5, dtype=torch.int32)}, "face_box"),
        (stages.REFERENCE, {"framing": "stretch"}, {}, "framing"),
        (stages.CLIPS, {"num_frames": "95"}, {}, "exceeds"),
        (stages.CLIPS, {}, {"latents": torch.zeros(0, 4, 16, 2, 3)}, "no clips"),
        (stages.CLIPS, {"framing": ""}, {}, "framing"),
    ],
    ids=lambda v: v.format if isinstance(v, stages.StageKind) else None,
)
def test_inconsistent_shapes_and_values(tmp_path, kind, meta, tensors, needle):
    path = tmp_path / "x.safetensors"
    write_valid(path, kind)
    rewrite(path, meta=meta, tensors=tensors)
    expect_error(path, kind, needle)


def test_save_refuses_what_load_would_refuse(tmp_path):
    path = tmp_path / "a.safetensors"
    tensors, meta = valid_stage(stages.AUDIO)
    with pytest.raises(ValueError, match="num_frames"):
        stages.save_stage(path, stages.AUDIO, {"features": tensors["features"][:3]}, meta)
    with pytest.raises(ValueError, match="missing"):
        stages.save_stage(path, stages.AUDIO, tensors, {k: v for k, v in meta.items() if k != "fps"})
    with pytest.raises(ValueError, match="unexpected"):
        stages.save_stage(path, stages.AUDIO, {**tensors, "x": torch.zeros(1)}, meta)
    assert not path.exists()


@pytest.mark.parametrize("bad", [25.0, True])
def test_save_never_writes_a_file_that_load_refuses(tmp_path, bad):
    path = tmp_path / "a.safetensors"
    tensors, meta = valid_stage(stages.AUDIO)
    try:
        stages.save_stage(path, stages.AUDIO, tensors, {**meta, "fps": bad})
    except (ValueError, TypeError):
        assert not path.exists()
        return
    stage = stages.load_stage(path, stages.AUDIO)
    assert type(stage.meta["fps"]) is int


def test_model_mismatch(audio_file):
    message = expect_error(audio_file, stages.AUDIO, "'tiny-random'", "'hallo3'", "--model hallo3", model="hallo3")
    assert message.count(str(audio_file)) == 1


def test_weights_mismatch(audio_file):
    expect_error(audio_file, stages.AUDIO, "different weights", weights="0" * 16)
    assert stages.load_stage(audio_file, stages.AUDIO, model="tiny-random", weights="f" * 16).model == "tiny-random"


def test_truncated_file(tmp_path, audio_file):
    blob = audio_file.read_bytes()
    header_len = struct.unpack("<Q", blob[:8])[0]
    data_start = 8 + header_len
    cuts = [0, 1, 4, 7, 8, 9, 8 + header_len // 2, data_start - 1, data_start, data_start + 1, (data_start + len(blob)) // 2, len(blob) - 1]
    for cut in sorted(set(cuts)):
        path = tmp_path / f"cut{cut}.safetensors"
        path.write_bytes(blob[:cut])
        message = expect_error(path, stages.AUDIO)
        assert re.search(r"truncated|corrupt|not a safetensors", message), message


def test_header_length_beyond_file(tmp_path):
    path = tmp_path / "big.safetensors"
    path.write_bytes(struct.pack("<Q", 50_000_000) + b"{}")
    expect_error(path, stages.AUDIO, "truncated")
    path.write_bytes(struct.pack("<Q", 2**63) + b"{}")
    expect_error(path, stages.AUDIO)


def test_text_file(tmp_path):
    path = tmp_path / "notes.safetensors"
    path.write_text("these are not tensors, just some notes\n" * 3)
    expect_error(path, stages.AUDIO, "not a safetensors stage file")


def test_header_not_an_object(tmp_path):
    path = tmp_path / "list.safetensors"
    write_raw(path, b"[1, 2]")
    expect_error(path, stages.AUDIO)
    write_raw(path, b'{"__metadata__": "text"}')
    expect_error(path, stages.AUDIO, "metadata")


def test_directory_and_missing_file(tmp_path):
    folder = tmp_path / "dir.safetensors"
    folder.mkdir()
    expect_error(folder, stages.AUDIO, "directory", error=InputError)
    missing = tmp_path / "missing.safetensors"
    expect_error(missing, stages.AUDIO, "no such file", error=InputError)
    with pytest.raises(InputError, match="no such file"):
        stages.read_header(missing)


def base_audio_file(tmp_path):
    path = tmp_path / "base.audio.safetensors"
    if not path.exists():
        write_valid(path, stages.AUDIO)
    return path


HEADER_CRASHES = {
    "list-valued format": {"format": ["hallo3.audio"], "format_version": "1"},
    "object-valued format": {"format": {"a": 1}, "format_version": "1"},
    "object-valued fps": {"format": "hallo3.audio", "format_version": "1", "fps": {"a": 1}},
}


@pytest.mark.parametrize("metadata", HEADER_CRASHES.values(), ids=HEADER_CRASHES.keys())
def test_non_string_metadata_values(tmp_path, metadata):
    path = tmp_path / "x.safetensors"
    base = stages.read_header(base_audio_file(tmp_path))
    write_raw(path, json.dumps({"__metadata__": {**base, **metadata}}).encode())
    expect_error(path, stages.AUDIO)


def test_deeply_nested_header(tmp_path):
    path = tmp_path / "deep.safetensors"
    write_raw(path, b"[" * 100_000)
    expect_error(path, stages.AUDIO)


# ---------------------------------------------------------------------------------------------
# atomic writes


def leftovers(folder, keep=()):
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


def test_invalid_tensors_leave_nothing(tmp_path):
    tensors, meta = valid_stage(stages.CLIP)
    with pytest.raises(ValueError, match="missing tensor"):
        stages.save_stage(tmp_path / "c.safetensors", stages.CLIP, {}, meta)
    with pytest.raises(ValueError, match="dimensions"):
        stages.save_stage(tmp_path / "c.safetensors", stages.CLIP, {"latents": tensors["latents"][0]}, meta)
    assert leftovers(tmp_path) == []


def test_failure_during_write_leaves_no_temp_file(tmp_path, monkeypatch):
    import safetensors.torch

    def half_write(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", half_write)
    tensors, meta = valid_stage(stages.AUDIO)
    with pytest.raises(OutputError, match="no space left on the device"):  # exit 4 (issue 18), not a raw OSError
        stages.save_stage(tmp_path / "a.safetensors", stages.AUDIO, tensors, meta)
    assert leftovers(tmp_path) == []


def test_existing_file_is_replaced_only_on_success(tmp_path, monkeypatch):
    import safetensors.torch

    path = tmp_path / "a.safetensors"
    write_valid(path, stages.AUDIO, seed=1)
    before = path.read_bytes()

    tensors, meta = valid_stage(stages.AUDIO, seed=2)
    with pytest.raises(ValueError):
        stages.save_stage(path, stages.AUDIO, {"features": tensors["features"].int()}, meta)
    assert path.read_bytes() == before

    def failing(tensors, filename, metadata=None):
        raise KeyboardInterrupt  # an interruption mid-write must not clobber the old file either

    with monkeypatch.context() as patch:
        patch.setattr(safetensors.torch, "save_file", failing)
        with pytest.raises(KeyboardInterrupt):
            stages.save_stage(path, stages.AUDIO, tensors, meta)
    assert path.read_bytes() == before
    assert leftovers(tmp_path) == ["a.safetensors"]

    stages.save_stage(path, stages.AUDIO, tensors, meta)
    assert torch.equal(stages.load_stage(path, stages.AUDIO)["features"], tensors["features"])
    assert leftovers(tmp_path) == ["a.safetensors"]


def test_output_in_missing_folder(tmp_path):
    path = tmp_path / "nowhere" / "a.safetensors"
    tensors, meta = valid_stage(stages.AUDIO)
    with pytest.raises(OutputError) as info:
        stages.save_stage(path, stages.AUDIO, tensors, meta)
    assert str(path) in str(info.value) and "does not exist" in str(info.value)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "nowhere").exists()


def test_output_path_is_a_directory(tmp_path):
    path = tmp_path / "out.safetensors"
    path.mkdir()
    tensors, meta = valid_stage(stages.AUDIO)
    with pytest.raises(OutputError, match="directory"):
        stages.save_stage(path, stages.AUDIO, tensors, meta)
    assert leftovers(tmp_path) == ["out.safetensors"]


# ---------------------------------------------------------------------------------------------
# fuzzing: the loader returns a valid Stage or raises StageFileError/InputError, nothing else


def check_outcome(path, kind, **kwargs):
    try:
        stage = stages.load_stage(path, kind, **kwargs)
    except InputError as err:  # StageFileError is an InputError
        message = str(err)
        assert len(message.splitlines()) == 1 and str(path) in message, message
        event("refused")
        return None
    assert stage.kind is kind
    for key, typ in stages._meta_types(kind).items():
        assert type(stage.meta[key]) is typ, key
    for spec in kind.tensors:
        assert stage[spec.name].ndim == spec.ndim
        assert str(stage[spec.name].dtype).removeprefix("torch.") in spec.dtypes
    assert set(stage.tensors) == {spec.name for spec in kind.tensors}
    event("loaded")
    return stage


@pytest.fixture(scope="module")
def valid_blobs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("blobs")
    blobs = {}
    for kind in ALL_KINDS:
        path = folder / f"{kind.format}.safetensors"
        write_valid(path, kind)
        blobs[kind.format] = path.read_bytes()
    return blobs


@FUZZ
@given(
    blob=st.one_of(
        st.binary(max_size=600),
        # a plausible length prefix followed by random text, to reach the JSON parser
        st.text(max_size=300).map(lambda s: struct.pack("<Q", len(s.encode("utf-8", "surrogatepass"))) + s.encode("utf-8", "surrogatepass")),
        st.binary(max_size=300).map(lambda b: struct.pack("<Q", len(b)) + b),
    ),
    kind=st.sampled_from(ALL_KINDS),
)
def test_fuzz_random_bytes(tmp_path, blob, kind):
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(blob)
    assert check_outcome(path, kind) is None  # random bytes are never a valid stage


@FUZZ
@given(
    fmt=st.sampled_from(list(stages.KINDS)),
    region=st.sampled_from(["header", "data", "anywhere"]),
    flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), max_size=6),
    cut=st.one_of(st.none(), st.floats(0, 1, exclude_max=True)),
    load_as=st.one_of(st.none(), st.sampled_from(ALL_KINDS)),  # None: as the kind it was written as
)
@example(fmt="hallo3.audio", region="anywhere", flips=[], cut=None, load_as=None)
@example(fmt="hallo3.audio", region="anywhere", flips=[], cut=None, load_as=stages.REFERENCE)
def test_fuzz_damaged_valid_file(tmp_path, valid_blobs, fmt, region, flips, cut, load_as):
    load_as = load_as or stages.KINDS[fmt]
    blob = bytearray(valid_blobs[fmt])
    header_end = 8 + struct.unpack("<Q", blob[:8])[0]
    start, stop = {"header": (0, header_end), "data": (header_end, len(blob)), "anywhere": (0, len(blob))}[region]
    for where, value in flips:
        blob[start + int(where * (stop - start))] = value
    if cut is not None:
        blob = blob[: int(cut * len(blob))]
    path = tmp_path / "damaged.safetensors"
    path.write_bytes(bytes(blob))
    stage = check_outcome(path, load_as)
    if not flips and cut is None:
        assert (stage is not None) == (load_as.format == fmt)


def _metadata_strategy():
    text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
    # no line breaks in versions until test_format_version_with_newline_stays_one_line passes
    version_text = st.text(st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp")), max_size=12)
    interesting = st.sampled_from(["", "0", "-1", "1", "25", "true", "false", "{}", "[]", "null", '{"a": 1}', "pad", "crop", "1e3", " 7 "])
    value = st.one_of(text, interesting)
    known_keys = sorted({key for kind in ALL_KINDS for key in stages._meta_types(kind)})
    return st.fixed_dictionaries(
        {
            "format": st.one_of(st.sampled_from(list(stages.KINDS)), text),
            "format_version": st.one_of(st.sampled_from(["1", "2", "01", ""]), version_text),
        },
        optional={key: value for key in known_keys},
    ).flatmap(lambda meta: st.dictionaries(text, value, max_size=4).map(lambda extra: {**extra, **meta}))


@FUZZ
@given(
    metadata=_metadata_strategy(),
    tensors_of=st.sampled_from(ALL_KINDS),
    load_as=st.sampled_from(ALL_KINDS),
    keep_valid=st.booleans(),
    overrides=st.integers(0, 2),
    model=st.sampled_from([None, "tiny-random", "hallo3"]),
)
def test_fuzz_random_metadata(tmp_path, metadata, tensors_of, load_as, keep_valid, overrides, model):
    tensors, meta = valid_stage(tensors_of)
    if keep_valid:  # start from the valid metadata and spoil only a few keys, so that the deep checks are reached
        base = {key: stages._encode(meta[key], typ) for key, typ in stages._meta_types(tensors_of).items()}
        base.update(format=tensors_of.format, format_version=str(tensors_of.version))
        metadata = {**base, **dict(list(metadata.items())[-overrides:] if overrides else [])}
    path = tmp_path / "meta.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    check_outcome(path, load_as, model=model)


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=8)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)),
    max_leaves=8,
)


@FUZZ
@given(metadata=st.dictionaries(st.sampled_from(["format", "format_version", "fps", "model", "params", "x"]), json_values, max_size=6))
@example(metadata={"format": ["hallo3.audio"]})
def test_fuzz_raw_json_header(tmp_path, metadata):
    """Headers safetensors itself would never write (non-string metadata values), as a hostile file could hold."""
    base = stages.read_header(base_audio_file(tmp_path))
    path = tmp_path / "raw.safetensors"
    write_raw(path, json.dumps({"__metadata__": {**base, **metadata}}).encode())
    check_outcome(path, stages.AUDIO)


@pytest.mark.parametrize("kind, change, needle", [
    (stages.FRAMES, {"offsets": torch.tensor([0, 9, 9, 30])}, "offsets must increase"),
    (stages.FRAMES, {"offsets": torch.tensor([0, 9, 20, 29])}, "offsets must run from 0 to the data's 30 bytes"),
    (stages.FRAMES, {"offsets": torch.tensor([0, 30])}, "offsets hold 2 entries for 3 frames"),
    (stages.FACE, {"found": torch.tensor([True, True, True])}, "frames_without_face is 1, found says 0"),
    (stages.FACE, {"boxes": torch.zeros(2, 4)}, "must hold num_frames = 3 rows"),
], ids=["unsorted", "short", "count", "found", "boxes"])
def test_training_kinds_refuse_inconsistent_files(tmp_path, kind, change, needle):
    """The training data's frames and face files: offsets and per-frame tables must agree with their metadata."""
    path = tmp_path / "x.safetensors"
    write_valid(path, kind)
    rewrite(path, tensors=change)
    expect_error(path, kind, needle)
