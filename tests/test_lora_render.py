"""LoRA adapters in diffusers' format applied to renders: ``pipe.load_lora_weights`` (the Python API) and
``hallo3 render --lora PATH[:SCALE]`` give the same latents, the adapters change them, and stage files and resume
keys follow the adapters."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import cut_wav
from safetensors.torch import load_file

pytest.importorskip("peft")
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("test_presets")]

PRESETS = Path(__file__).with_name("presets_test.toml")
MODEL = "tiny-test"


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory) -> Path:
    """Adapters on the tiny-test DiT's attention (random, non-zero B) saved as a fine-tuning run would."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from hallo3_cli import Hallo3Pipeline
    from hallo3_cli.loading import load_network
    from hallo3_cli.presets import get_preset

    transformer = load_network(get_preset(MODEL), "transformer")
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    folder = tmp_path_factory.mktemp("run") / "lora"
    Hallo3Pipeline.save_lora_weights(folder, transformer_lora_layers=get_peft_model_state_dict(transformer))
    return folder


@pytest.fixture(scope="module")
def stage_files(media_dir, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("stages")
    speech = cut_wav(media_dir / "speech_0001.wav", root / "one.wav", 1.2)
    hallo3("embed-audio", speech, "-o", root / "a.safetensors", "--model", MODEL, "-q")
    hallo3("encode-ref", media_dir / "face_0003.jpg", "-o", root / "r.safetensors", "--model", MODEL, "-q")
    return root / "a.safetensors", root / "r.safetensors"


def hallo3(*args) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "hallo3_cli", *map(str, args)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def render(stage_files, out: Path, *extra) -> torch.Tensor:
    audio, reference = stage_files
    hallo3("render", "--audio", audio, "--ref", reference, "-o", out, "--seed", "7", "-q", *extra)
    return load_file(str(out))["latents"]


@pytest.fixture(scope="module")
def base(stage_files, tmp_path_factory) -> torch.Tensor:
    return render(stage_files, tmp_path_factory.mktemp("base") / "base.safetensors")


def test_cli_lora_equals_the_python_api(lora_dir, stage_files, base, tmp_path):
    from hallo3_cli import Hallo3Pipeline, stages

    adapted = render(stage_files, tmp_path / "lora.safetensors", "--lora", f"{lora_dir}:1.0")
    assert not torch.allclose(base, adapted, atol=1e-3)  # the adapters change the render
    params = stages.load_stage(tmp_path / "lora.safetensors", stages.CLIPS).params
    assert params["lora_scale"] == 1.0 and len(params["lora"]) == 1  # the clips file says which adapters made it

    pipe = Hallo3Pipeline.from_pretrained(MODEL)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(lora_dir)  # diffusers' loader, the file hallo3 train exports
    audio = stages.audio_from_stage(stages.load_stage(stage_files[0], stages.AUDIO))
    reference = stages.reference_from_stage(stages.load_stage(stage_files[1], stages.REFERENCE))
    latents = torch.stack([clip.latents for clip in pipe.generate_clips(audio, reference, seed=7, progress=False,
                                                                        decode_last=False)])
    assert torch.equal(latents, adapted)


def test_lora_scale_zero_is_the_base_model(lora_dir, stage_files, base, tmp_path):
    off = render(stage_files, tmp_path / "off.safetensors", "--lora", f"{lora_dir}:0")
    assert torch.allclose(off, base, atol=1e-4, rtol=1e-4)  # (not bitwise: adapted layers take the unfolded path)


def test_bad_lora_arguments_are_one_line_errors(lora_dir, tmp_path):
    for spec, code, words in ((f"{lora_dir}:11", 2, "scale"), (tmp_path / "missing", 3, "missing"),
                              (PRESETS, 3, "not a LoRA weights file")):
        result = subprocess.run([sys.executable, "-m", "hallo3_cli", "render", "--audio", "a.safetensors", "--ref",
                                 "r.safetensors", "-o", str(tmp_path / "o.safetensors"), "--lora", str(spec)],
                                capture_output=True, text=True, cwd=tmp_path)
        assert result.returncode == code, result.stderr
        assert words in result.stderr and "Traceback" not in result.stderr
