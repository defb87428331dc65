"""``hallo3 download`` / ``ensure_weights`` / ``hallo3 doctor`` without network.

The Hugging Face Hub is replaced at the huggingface_hub boundary: ``huggingface_hub.get_hf_file_metadata``
and ``huggingface_hub.hf_hub_download`` are swapped for fakes that serve files from a folder built
here (tiny but loadable weights under the release's file names), and that can fail mid-way.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from collections import namedtuple
from pathlib import Path
from urllib.parse import unquote

import huggingface_hub
import pytest
import torch
from huggingface_hub.file_download import HfFileMetadata
from test_convert import MAIN_EXTRA, OTHER_DIMS, to_official

import hallo3_cli.hub as weights
from hallo3_cli import formatting, store
from hallo3_cli.doctor import doctor, format_doctor
from hallo3_cli.errors import InputError, ModelError, OutputError
from hallo3_cli.networks import fill_random_
from hallo3_cli.presets import MODELS_TOML, get_preset

RELEASE = "hallo3"


# ---------------------------------------------------------------------------------------------
# tiny weights under the release's names


def _official_checkpoint(folder: Path, main, reference) -> None:
    """An official SAT/DeepSpeed checkpoint folder: ``latest`` + ``1/mp_rank_00_model_states.pt``."""
    state = to_official(main.state_dict(), "model.diffusion_model.", OTHER_DIMS["num_layers"])
    state.update(to_official(reference.state_dict(), "ref_model.diffusion_model.", OTHER_DIMS["num_layers"]))
    (folder / "1").mkdir(parents=True)
    (folder / "latest").write_text("1\n")
    torch.save({"module": state, "iteration": 1}, folder / "1" / "mp_rank_00_model_states.pt")


def _tiny_t5():
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2, feed_forward_proj="gated-gelu")
    model = T5EncoderModel(config).eval()
    fill_random_(model, seed=3)
    return model


def _save_t5_in_two_shards(model, folder: Path) -> None:
    """The layout of THUDM/CogVideoX-5b-I2V text_encoder/: config, index and two named shards."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"}
    keys = sorted(state)
    halves = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2], "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    weight_map = {}
    for name, part in halves.items():
        save_file({k: state[k] for k in part}, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    total = sum(t.numel() * t.element_size() for t in state.values())
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))


def _tiny_wav2vec(folder: Path) -> None:
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    widths = get_preset("tiny-random").config("wav2vec")
    model = Wav2Vec2Model(Wav2Vec2Config(**widths))
    fill_random_(model, seed=5)
    model.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({"sampling_rate": 16000, "do_normalize": True, "feature_size": 1}))


def _tiny_vae(folder: Path) -> None:
    from diffusers import AutoencoderKLCogVideoX

    blocks = ("CogVideoXDownBlock3D",) * 4
    model = AutoencoderKLCogVideoX(
        block_out_channels=(8, 8, 8, 8), down_block_types=blocks, up_block_types=("CogVideoXUpBlock3D",) * 4,
        layers_per_block=1, norm_num_groups=4, latent_channels=16, scaling_factor=0.7,
    )
    model.save_pretrained(folder)


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, "a": 3, "person": 4, "talking": 5}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def tiny_dits():
    from hallo3_cli.models import Hallo3ReferenceNet, Hallo3Transformer3DModel

    main = Hallo3Transformer3DModel(**OTHER_DIMS, **MAIN_EXTRA).eval()
    reference = Hallo3ReferenceNet(**OTHER_DIMS).eval()
    fill_random_(main, seed=21, std=0.1)
    fill_random_(reference, seed=22, std=0.1)
    return main, reference


@pytest.fixture(scope="module")
def hub_root(tmp_path_factory, tiny_dits):
    """A fake Hub: ``<root>/<repo>/<revision>/<path>`` for every file of the release preset."""
    root = tmp_path_factory.mktemp("hub")
    preset = get_preset(RELEASE)
    made = {}
    for source in weights.sources(preset):
        base = root / source.repo / source.revision / source.subfolder
        base.mkdir(parents=True, exist_ok=True)
        if source.name == "dit":
            _official_checkpoint(base, *tiny_dits)
        elif source.name == "vae":
            _tiny_vae(base)
        elif source.name == "text_encoder":
            _save_t5_in_two_shards(_tiny_t5(), base)
        elif source.name == "wav2vec":
            _tiny_wav2vec(base)
        for file in source.files:  # anything else (tokenizer, ONNX files): a few bytes of the right name
            path = base / file
            if not path.exists():
                path.write_text("{}" if file.endswith(".json") else f"fake {file}\n" * 50)
        made[source.name] = sorted(str(p.relative_to(base)) for p in base.rglob("*") if p.is_file())
    for source in weights.sources(preset):
        assert set(source.files) <= set(made[source.name]), source.name
    return root


class FakeHub:
    """Stands in for huggingface_hub's metadata and download calls, serving files from ``root``."""

    def __init__(self, root: Path):
        self.root = root
        self.downloaded: list[str] = []
        self.metadata_calls = 0
        self.fail_on: str | None = None  # raise mid-way through this file
        self.truncate: str | None = None  # deliver this file 10 bytes short
        self.garble: str | None = None  # deliver this file with its first bytes overwritten

    def _source(self, repo_id: str, revision: str, path: str) -> Path:
        file = self.root / repo_id / revision / path
        if not file.is_file():
            raise huggingface_hub.errors.EntryNotFoundError(f"{path} not in {repo_id}@{revision}")
        return file

    def get_hf_file_metadata(self, url, *args, **kwargs):
        self.metadata_calls += 1
        head, tail = url.split("/resolve/", 1)
        repo_id = "/".join(head.split("/")[-2:])
        revision, path = tail.split("/", 1)
        revision, path = unquote(revision), unquote(path)
        size = self._source(repo_id, revision, path).stat().st_size
        return HfFileMetadata(commit_hash=revision, etag="fake", location=url, size=size, xet_file_data=None)

    def hf_hub_download(self, repo_id, filename, *, subfolder=None, revision=None, local_dir=None, **kwargs):
        path = f"{subfolder}/{filename}" if subfolder else filename
        source = self._source(repo_id, revision, path)
        target = Path(local_dir) / path
        if target.is_file() and target.stat().st_size == source.stat().st_size:
            return str(target)  # already fetched: the library returns it without downloading
        partial = Path(local_dir) / ".cache" / "huggingface" / "download" / f"{Path(path).name}.fake.incomplete"
        partial.parent.mkdir(parents=True, exist_ok=True)
        data = source.read_bytes()
        if path == self.fail_on:
            partial.write_bytes(data[: len(data) // 2])
            raise ConnectionError("Connection reset by peer")
        if path == self.truncate:
            data = data[:-10]
        if path == self.garble:
            data = b"\xff" * 8 + data[8:]
        partial.write_bytes(data)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(partial, target)
        self.downloaded.append(path)
        return str(target)


@pytest.fixture
def hub(hub_root, monkeypatch):
    fake = FakeHub(hub_root)
    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", fake.get_hf_file_metadata)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake.hf_hub_download)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    return fake


@pytest.fixture
def home(tmp_path, monkeypatch):
    root = tmp_path / "models"
    monkeypatch.setenv("HALLO3_HOME", str(root))
    return root


def _assert_nothing_incomplete_looks_complete(preset_dir: Path) -> None:
    """Every visible component folder holds a marker whose files are all there, with their sizes."""
    if not preset_dir.exists():
        return
    for folder in preset_dir.iterdir():
        if folder.name.startswith(".") or folder.is_symlink() or folder.name in ("model_index.json", "scheduler"):
            continue  # the pipeline's index, scheduler config and component-name links (write_model_index)
        marker = json.loads((folder / store.MARKER).read_text())
        assert marker["files"], folder
        for name, size in marker["files"].items():
            assert (folder / name).stat().st_size == size, (folder, name)


# ---------------------------------------------------------------------------------------------
# dry run and planning


def test_dry_run_lists_every_component_and_the_total_of_models_toml(home):
    with open(MODELS_TOML, "rb") as f:
        table = tomllib.load(f)[RELEASE]["components"]
    report = weights.download(RELEASE, dry_run=True)
    assert report.total == sum(entry["size"] for entry in table.values())
    assert 35e9 < report.total < 55e9
    assert {c.name for c in report.components} == set(table)
    assert all(c.action == "fetch" and c.size == table[c.name]["size"] for c in report.components)
    text = str(report)
    assert str(home / RELEASE) in text and "transformer/, reference/" in text
    assert formatting.human_size(report.total) in text
    assert not home.exists()  # a dry run writes nothing
    elsewhere = weights.download(RELEASE, dry_run=True, dest=home.parent / "elsewhere")
    assert elsewhere.home == home.parent / "elsewhere" / RELEASE and f"HALLO3_HOME={home.parent / 'elsewhere'}" in elsewhere.summary()


def test_release_components_are_pinned_and_documented():
    preset = get_preset(RELEASE)
    folders = weights.component_names(preset)
    assert sorted(folders) == sorted(
        ["transformer", "reference", "vae", "text_encoder", "tokenizer", "wav2vec", "face_analysis", "audio_separator",
         "syncnet"]
    )
    for source in weights.sources(preset):
        assert len(source.revision) == 40 and int(source.revision, 16) >= 0, source.name
        assert source.licence and source.size > 0 and source.files
    dit = next(s for s in weights.sources(preset) if s.convert)
    assert "CogVideoX" in dit.licence and dit.produces == ("transformer", "reference")


def test_unknown_component_and_random_presets():
    with pytest.raises(InputError, match="unknown component 'nope'"):
        weights.download(RELEASE, dry_run=True, components=["nope"])
    report = weights.download("tiny-random")
    assert report.components == [] and "generated in memory" in report.summary()
    weights.ensure_weights("tiny-random", ["transformer", "vae"], allow_download=False)  # no-op


# ---------------------------------------------------------------------------------------------
# fetching: install, verify, idempotency, interruption, disk space


def test_fetch_installs_loadable_components_and_a_second_run_does_nothing(hub, home, tiny_dits, monkeypatch):
    from transformers import T5EncoderModel

    from hallo3_cli.loading import load_feature_extractor, load_network

    preset = get_preset(RELEASE)
    preset_dir = home / RELEASE
    published = []
    real_replace = os.replace

    def spy_replace(src, dst, *args, **kwargs):  # a component folder must be complete before it appears
        if Path(dst).parent == preset_dir and not Path(dst).name.startswith(".") and Path(src).is_dir():
            published.append((Path(dst).name, (Path(src) / store.MARKER).is_file()))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", spy_replace)
    report = weights.download(RELEASE, progress=False)
    assert sorted(published) == sorted((name, True) for name in weights.component_names(preset))
    assert report.home == preset_dir and not report.already_installed
    pipeline_files = {"model_index.json", "scheduler", "reference_net", "audio_encoder", "feature_extractor"}
    assert sorted(p.name for p in preset_dir.iterdir() if not p.name.startswith(".")) == sorted(
        [*weights.component_names(preset), *pipeline_files])
    assert not (preset_dir / store.DOWNLOADS / "dit").exists()  # the staging checkpoint is deleted after conversion
    assert not (preset_dir / store.BUILD).exists()
    _assert_nothing_incomplete_looks_complete(preset_dir)
    marker = store.read_marker(preset_dir / "transformer")
    assert marker["revision"] == next(s for s in weights.sources(preset) if s.convert).revision
    assert marker["fingerprint"] and marker["source"] == "hub"

    for ours, loaded in zip(tiny_dits, (load_network(preset, "transformer"), load_network(preset, "reference"))):
        state = loaded.state_dict()
        assert all(torch.equal(state[k], v) for k, v in ours.state_dict().items())
    assert list(load_network(preset, "vae").config.block_out_channels) == [8] * 4
    assert T5EncoderModel.from_pretrained(preset.require("text_encoder")).config.d_model == 16
    encoder = load_network(preset, "wav2vec")
    assert encoder.config.hidden_size == 32 and load_feature_extractor(preset).sampling_rate == 16000
    assert (preset.require("face_analysis") / "glintr100.onnx").is_file()

    # the model home is a diffusers folder: Hallo3Pipeline.from_pretrained loads it offline
    from hallo3_cli import Hallo3Pipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # (the fake hub's tokenizer and ONNX files are a few bytes: a real tokenizer instead, no face models)
    pipe = Hallo3Pipeline.from_pretrained(preset_dir, torch_dtype=torch.bfloat16, tokenizer=_tiny_tokenizer(),
                                          face_analyzer=None)
    assert pipe.transformer.dtype == torch.bfloat16 and pipe.reference_net.config.num_layers == tiny_dits[1].config.num_layers
    assert pipe.audio_encoder.config.hidden_size == 32 and pipe.feature_extractor.sampling_rate == 16000
    assert type(pipe.scheduler).__name__ == "Hallo3DPMSolverSDEScheduler" and pipe.config.height == 480
    assert pipe.encode_prompt("a person talking").shape == (226, 16)
    monkeypatch.delenv("HF_HUB_OFFLINE")

    fetched = list(hub.downloaded)
    stamps = {p: p.stat().st_mtime_ns for p in preset_dir.rglob("*")}
    again = weights.download(RELEASE, progress=False)
    assert again.already_installed and "already installed" in again.summary()
    assert hub.downloaded == fetched  # nothing fetched again
    assert {p: p.stat().st_mtime_ns for p in preset_dir.rglob("*") if p.name != store.LOCK} == {
        p: t for p, t in stamps.items() if p.name != store.LOCK
    }
    weights.ensure_weights(preset, weights.component_names(preset), allow_download=False)  # all there: no error


def test_interrupted_download_leaves_nothing_that_looks_complete_and_resumes(hub, home):
    preset_dir = home / RELEASE
    hub.fail_on = "hallo3/1/mp_rank_00_model_states.pt"  # the DiT comes last (largest)
    with pytest.raises(ModelError, match="cannot reach") as err:
        weights.download(RELEASE, progress=False)
    assert "\n" not in str(err.value)
    assert not (preset_dir / "transformer").exists() and not (preset_dir / "reference").exists()
    dit = next(s for s in weights.sources(get_preset(RELEASE)) if s.convert)
    assert store.component_state(preset_dir, "transformer", dit.name).state == "partial"
    _assert_nothing_incomplete_looks_complete(preset_dir)
    with pytest.raises(ModelError, match="not installed"):
        weights.ensure_weights(RELEASE, ["transformer"], allow_download=False)
    first = list(hub.downloaded)
    assert "hallo3/latest" in first and "vae/config.json" in first

    hub.fail_on = None
    report = weights.download(RELEASE, progress=False)
    assert {c.name: c.action for c in report.components} == {
        s.name: "fetch" if s.convert else "installed" for s in weights.sources(get_preset(RELEASE))
    }
    assert "rerun the same command to resume" in str(err.value)
    assert hub.downloaded[len(first):] == ["hallo3/1/mp_rank_00_model_states.pt"]  # only what was missing
    _assert_nothing_incomplete_looks_complete(preset_dir)
    assert store.component_state(preset_dir, "reference").state == "complete"


def test_corrupt_transfer_is_refused(hub, home):
    hub.truncate = "vae/diffusion_pytorch_model.safetensors"
    with pytest.raises(ModelError, match="the Hub announced"):
        weights.download(RELEASE, progress=False, components=["vae"])
    assert not (home / RELEASE / "vae").exists()
    hub.truncate = None
    hub.garble = "vae/diffusion_pytorch_model.safetensors"
    with pytest.raises(ModelError, match="diffusion_pytorch_model.safetensors from THUDM.* is damaged.*rerun"):
        weights.download(RELEASE, progress=False, components=["vae"])
    assert not (home / RELEASE / "vae").exists()
    hub.garble = None
    weights.download(RELEASE, progress=False, components=["vae"])
    assert store.component_state(home / RELEASE, "vae").state == "complete"
    assert hub.downloaded.count("vae/diffusion_pytorch_model.safetensors") == 3  # refetched after each failure
    (home / RELEASE / "vae" / "config.json").write_text("{}")  # changed behind our back
    assert store.component_state(home / RELEASE, "vae").state == "damaged"


def test_converted_folders_are_checked_against_the_model_class(hub, home, tmp_path):
    weights.download(RELEASE, progress=False, components=["dit"])
    folder = tmp_path / "transformer"
    shutil.copytree(home / RELEASE / "transformer", folder)
    weights.verify_converted(folder, "Hallo3Transformer3DModel")
    with pytest.raises(ModelError, match="do not match Hallo3ReferenceNet: unexpected .*audio"):
        weights.verify_converted(folder, "Hallo3ReferenceNet")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_layers": config["num_layers"] + 1}))
    with pytest.raises(ModelError, match=r"missing transformer_blocks\.3\."):
        weights.verify_converted(folder, "Hallo3Transformer3DModel")
    (folder / "config.json").write_text(json.dumps(config))
    shard = folder / "diffusion_pytorch_model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-4])
    with pytest.raises(ModelError, match="truncated"):
        weights.verify_converted(folder, "Hallo3Transformer3DModel")


def test_not_enough_disk_space_fails_before_writing_anything(hub, home, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**12, 10**12 - 1000, 1000))
    with pytest.raises(OutputError, match=r"not enough free disk space.*only 1\.0 kB free"):
        weights.download(RELEASE, progress=False)
    assert not home.exists() and hub.downloaded == []


def test_a_second_concurrent_download_is_refused(hub, home):
    from filelock import FileLock

    (home / RELEASE).mkdir(parents=True)
    with FileLock(str(home / RELEASE / store.LOCK)):
        with pytest.raises(ModelError, match="another 'hallo3 download' is installing"):
            weights.download(RELEASE, progress=False, components=["tokenizer"])
    assert hub.downloaded == []
    weights.download(RELEASE, progress=False, components=["tokenizer"])
    assert store.component_state(home / RELEASE, "tokenizer").state == "complete"


def test_ensure_weights_downloads_what_is_missing_and_announces_it(hub, home, caplog):
    with caplog.at_level("WARNING", logger="hallo3"):
        weights.ensure_weights(RELEASE, ["vae", "wav2vec"], progress=False)
    assert any("downloading" in r.getMessage() and str(home / RELEASE) in r.getMessage() for r in caplog.records)
    assert sorted(p.name for p in (home / RELEASE).iterdir() if not p.name.startswith(".")) == ["vae", "wav2vec"]
    assert not any(p.startswith("hallo3/") for p in hub.downloaded)


# ---------------------------------------------------------------------------------------------
# offline and unreachable hub


def test_offline_mode_refuses_with_the_command_to_run(home, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    # exactly the missing components, with their size (issue 18: not the whole 40 GB preset)
    with pytest.raises(ModelError, match=r"transformer, vae weights .*GB\).*HF_HUB_OFFLINE=1.*"
                                         r"run: hallo3 download --model hallo3 --component transformer --component vae$"):
        weights.ensure_weights(RELEASE, ["transformer", "vae"])
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(ModelError, match=r"--no-download.*run: hallo3 download --model hallo3 --component transformer$"):
        weights.ensure_weights(RELEASE, ["transformer"], allow_download=False)
    assert not home.exists()


_RUN = """
import sys
from hallo3_cli.errors import Hallo3Error
from hallo3_cli.hub import download
try:
    download(progress=False)
except Hallo3Error as err:
    print(f"hallo3: error: {err}", file=sys.stderr)
    sys.exit(err.exit_code)
"""


@pytest.mark.parametrize(
    "env, needle",
    [({"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE=1"), ({"HF_ENDPOINT": "http://127.0.0.1:9"}, "cannot reach the Hugging Face Hub")],
)
def test_offline_or_unreachable_hub_is_one_line_and_fast(tmp_path, env, needle):
    environ = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT")}
    environ.update(HALLO3_HOME=str(tmp_path / "models"), **env)
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-c", _RUN], capture_output=True, text=True, env=environ, timeout=60)
    elapsed = time.monotonic() - start
    assert result.returncode == ModelError.exit_code, result.stderr
    assert elapsed < 30
    assert result.stderr.strip().count("\n") == 0 and needle in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "models").exists()


# ---------------------------------------------------------------------------------------------
# --from: importing an official pretrained_models/ folder


@pytest.fixture(scope="module")
def official(tmp_path_factory, tiny_dits):
    """An official-layout pretrained_models/ folder with tiny weights."""
    root = tmp_path_factory.mktemp("official") / "pretrained_models"
    _official_checkpoint(root / "hallo3", *tiny_dits)
    t5 = root / "t5-v1_1-xxl"
    _tiny_t5().save_pretrained(t5)
    _tiny_tokenizer().save_pretrained(t5)
    _tiny_wav2vec(root / "wav2vec" / "wav2vec2-base-960h")
    faces = root / "face_analysis" / "models"
    faces.mkdir(parents=True)
    for name in ("scrfd_10g_bnkps.onnx", "glintr100.onnx", "1k3d68.onnx", "face_landmarker_v2_with_blendshapes.task"):
        (faces / name).write_bytes(os.urandom(2048))
    (root / "audio_separator").mkdir()
    (root / "audio_separator" / "Kim_Vocal_2.onnx").write_bytes(os.urandom(4096))
    (root / "cogvideox-5b-i2v-sat" / "vae").mkdir(parents=True)
    (root / "cogvideox-5b-i2v-sat" / "vae" / "3d-vae.pt").write_bytes(b"SAT pickle, not imported")
    return root


def test_import_official_folder_without_network(official, home, tiny_dits, monkeypatch):
    from hallo3_cli.loading import load_network, load_tokenizer

    def no_network(*args, **kwargs):
        raise AssertionError("--from must not touch the network")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)
    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", no_network)
    before = sorted((p.relative_to(official), p.stat().st_size) for p in official.rglob("*") if p.is_file())

    plan = weights.download(RELEASE, from_dir=official, dry_run=True)
    assert not home.exists() and {c.name for c in plan.components if c.action == "import"} == {
        "dit", "text_encoder", "tokenizer", "wav2vec", "face_analysis", "audio_separator"
    }
    report = weights.download(RELEASE, from_dir=official, progress=False)
    preset = get_preset(RELEASE)
    preset_dir = home / RELEASE
    assert [c.name for c in report.missing] == ["vae"]
    assert "run: hallo3 download --model hallo3" in report.summary() and "vae" in report.summary()
    _assert_nothing_incomplete_looks_complete(preset_dir)
    assert sorted((p.relative_to(official), p.stat().st_size) for p in official.rglob("*") if p.is_file()) == before

    for ours, loaded in zip(tiny_dits, (load_network(preset, "transformer"), load_network(preset, "reference"))):
        state = loaded.state_dict()
        assert all(torch.equal(state[k], v) for k, v in ours.state_dict().items())
    tokenizer, encoder = load_tokenizer(preset), load_network(preset, "text_encoder")
    assert encoder(tokenizer("a person talking", return_tensors="pt").input_ids)[0].shape[-1] == 16
    assert sorted(p.name for p in preset.require("tokenizer").iterdir() if not p.name.startswith(".")) == sorted(
        p.name for p in (official / "t5-v1_1-xxl").iterdir() if p.name.startswith(("tokenizer", "special"))
    )
    assert not list(preset.require("text_encoder").glob("tokenizer*"))
    faces = preset.require("face_analysis")
    assert os.path.samefile(faces / "glintr100.onnx", official / "face_analysis" / "models" / "glintr100.onnx")  # hard link
    assert not (faces / "1k3d68.onnx").exists()  # only what hallo3 uses
    with pytest.raises(ModelError, match="hallo3 download --model hallo3"):
        preset.require("vae")

    again = weights.download(RELEASE, from_dir=official, progress=False)
    assert [c.name for c in again.components if c.action not in ("installed", "skipped")] == ["vae"]
    assert [c.name for c in again.components if c.action == "skipped"] == ["syncnet"]  # optional, not in that layout
    assert all(c.size == 0 for c in again.components if c.action == "installed")


def test_import_rejects_a_folder_that_is_not_official(tmp_path, home):
    (tmp_path / "random").mkdir()
    with pytest.raises(InputError, match="not an official pretrained_models"):
        weights.download(RELEASE, from_dir=tmp_path / "random")
    with pytest.raises(InputError, match="not a folder"):
        weights.download(RELEASE, from_dir=tmp_path / "nope")
    assert not home.exists()


# ---------------------------------------------------------------------------------------------
# doctor


def test_doctor_reports_states_disk_and_fit(hub, home):
    weights.download(RELEASE, progress=False, components=["wav2vec"])
    (home / RELEASE / store.DOWNLOADS / "vae").mkdir(parents=True)
    (home / RELEASE / store.DOWNLOADS / "vae" / "part.incomplete").write_bytes(b"x" * 1000)
    report = doctor(RELEASE, device="cpu", dtype="bfloat16")
    states = {c["name"]: c["state"] for c in report["components"]}
    assert states["wav2vec"] == "complete" and states["vae"] == "partial" and states["transformer"] == "missing"
    assert report["unfinished_downloads"] == {"vae": 1000}
    assert report["disk"]["free"] > 0 and report["torch"] == torch.__version__
    fit = report["fit"]
    assert fit["source"] == "plan" and fit["needed"] > 8_921_253_952 * 2 and fit["verdict"] in ("no", "unknown")
    assert (fit["verdict"] == "no") == (fit["available"] < fit["needed"])
    text = format_doctor(report)
    assert "wav2vec" in text and "partial" in text and "hallo3 download --model hallo3" in text
    json.dumps(report)  # machine readable
    assert doctor("tiny-random")["fit"]["verdict"] == "fits"
