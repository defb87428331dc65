"""Worker of tests/test_parallel.py, started by ``python -m torch.distributed.run``.

    python -m torch.distributed.run --nproc-per-node 4 tests/parallel_worker.py OUT_DIR 2,2,1 1,1,4 ...

Builds the same tiny random Hallo3 transformer on every rank, runs the batch-2 CFG denoiser call in
one process (the reference), then once per ``cfg,ulysses,ring`` split with the model parallelized,
and writes ``OUT_DIR/rank<R>.json``: the relative max difference of each split, and checks of the
projection-only call, ``return_dict=True`` and the model after ``remove()``.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("HALLO3_PRESETS", str(REPO / "tests" / "presets_test.toml"))

from hallo3_cli.networks import transformer_config  # noqa: E402
from hallo3_cli.models import Hallo3Transformer3DModel  # noqa: E402
from hallo3_cli.parallel import Degrees, init_parallel, parallelize_transformer  # noqa: E402
from hallo3_cli.networks import fill_random_
from hallo3_cli.presets import get_preset  # noqa: E402

LATENT = (13, 6, 10)  # 15 tokens per frame and in the bank: 226 + 195 tokens, uneven shards for 2, 3, 4 ranks


def tiny_model() -> Hallo3Transformer3DModel:
    """The tiny-test DiT with 4 heads of 32 (so Ulysses 2 and 4 divide them), weights far from neutral."""
    config = transformer_config(get_preset("tiny-test"), main=True)
    config.update(num_attention_heads=4, attention_head_dim=32)
    model = Hallo3Transformer3DModel(**config)
    fill_random_(model, 7, std=0.2)
    return model.eval().requires_grad_(False)


def cfg_inputs(model: Hallo3Transformer3DModel, bank_batch: int) -> dict:
    """The batch-2 CFG call of ``Renderer.denoise_clip`` (precomputed audio/face tokens, shared bank)."""
    g = torch.Generator().manual_seed(3)
    config = model.config
    frames, height, width = LATENT
    tokens = height * width // config.patch_size**2
    return dict(
        hidden_states=torch.randn(2, frames, config.in_channels, height, width, generator=g),
        encoder_hidden_states=torch.randn(2, config.max_text_seq_length, config.text_embed_dim, generator=g),
        timestep=torch.tensor([500.0, 500.0]),
        audio_tokens=torch.randn(2, frames, config.audio_context_tokens, config.audio_cross_attention_dim, generator=g),
        face_tokens=torch.randn(2, config.face_tokens, config.face_cross_attention_dim, generator=g),
        ref_states=[torch.randn(bank_batch, tokens, config.num_attention_heads * config.attention_head_dim, generator=g)
                    for _ in range(config.num_layers)],
    )


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@torch.no_grad()
def main(out_dir: str, splits: list[str]) -> None:
    torch.manual_seed(0)
    model = tiny_model()
    audio = torch.randn(2, 49, 5, model.config.audio_layers, model.config.audio_channels, generator=torch.Generator().manual_seed(5))
    results = {}
    for split in splits:
        cfg, ulysses, ring = map(int, split.split(","))
        bank_batch = 2 if cfg == 2 else 1
        inputs = cfg_inputs(model, bank_batch)
        expected = model(**inputs, return_dict=False)[0]
        expected_audio = model.project_audio(audio)
        config = init_parallel(Degrees(cfg, ulysses, ring))
        state = parallelize_transformer(model, config)
        out = model(**inputs, return_dict=False)[0]
        sample = model(**inputs).sample
        projected = model.project_audio(audio)
        state.remove()
        after = model(**inputs, return_dict=False)[0]
        results[split] = {
            "shape_ok": list(out.shape) == list(expected.shape),
            "rel": rel(out, expected),
            "rel_return_dict": rel(sample, expected),
            "projection_equal": bool(torch.equal(projected, expected_audio)),
            "restored_equal": bool(torch.equal(after, expected)),
            "max_abs": expected.abs().max().item(),
            "sha256": hashlib.sha256(out.numpy().tobytes()).hexdigest(),  # every rank must get the same bytes
        }
    rank = torch.distributed.get_rank()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
