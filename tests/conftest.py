"""Shared test fixtures: where ../shared lives, and small helpers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("HALLO3_SHARED", REPO.parent / "shared")).resolve()
OFFICIAL = SHARED / "fixtures" / "official"
MEDIA = SHARED / "fixtures" / "media"
TEST_PRESETS = Path(__file__).with_name("presets_test.toml")


def pytest_configure(config):
    """Under pytest-xdist (the README's command runs one worker per core), each worker and the processes it starts
    use their share of the cores: torch's default of one thread per core in every worker oversubscribes them."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        threads = str(max(1, (os.cpu_count() or 1) // workers))
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = threads
        import torch

        torch.set_num_threads(int(threads))


def cut_wav(source: Path, target: Path, seconds: float) -> Path:
    """The first ``seconds`` of a wav file (stdlib only): short real speech for end-to-end tests."""
    import wave

    with wave.open(str(source)) as src:
        params = src.getparams()
        frames = src.readframes(int(seconds * src.getframerate()))
    with wave.open(str(target), "wb") as dst:
        dst.setparams(params)
        dst.writeframes(frames)
    return target


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"shared fixture {path} is not available (set HALLO3_SHARED)")
    return path


@pytest.fixture(scope="session")
def official_dir() -> Path:
    return _need(OFFICIAL)


@pytest.fixture(scope="session")
def media_dir() -> Path:
    return _need(MEDIA)


@pytest.fixture(scope="session")
def fixture(official_dir):
    """Tensors of tiny_official.safetensors (official weights, inputs and outputs)."""
    from safetensors.torch import load_file

    return load_file(str(official_dir / "tiny_official.safetensors"))


@pytest.fixture(scope="session")
def converted(fixture, tmp_path_factory):
    """The fixture's official weights written as an official checkpoint folder, converted and loaded."""
    import torch

    from hallo3_cli.hub.convert import convert_checkpoint
    from hallo3_cli.models import Hallo3ReferenceNet, Hallo3Transformer3DModel

    root = tmp_path_factory.mktemp("official")
    weights = {k: v for k, v in fixture.items() if k.startswith(("model.", "ref_model."))}
    (root / "ckpt" / "1").mkdir(parents=True)
    (root / "ckpt" / "latest").write_text("1\n")
    torch.save({"module": weights, "iteration": 1}, root / "ckpt" / "1" / "mp_rank_00_model_states.pt")
    folders = convert_checkpoint(root / "ckpt", root / "diffusers")
    main = Hallo3Transformer3DModel.from_pretrained(folders["transformer"]).eval()
    reference = Hallo3ReferenceNet.from_pretrained(folders["reference"]).eval()
    return main, reference


@pytest.fixture(scope="module")
def test_presets():
    """The test presets (tiny-test, ...) beside the packaged ones for a whole module
    (``pytestmark = pytest.mark.usefixtures("test_presets")``)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HALLO3_PRESETS", str(TEST_PRESETS))
        yield
