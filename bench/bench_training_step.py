"""How close the training step is to the official one (tiny_train.*), with and without gradient checkpointing.

    PYTHONPATH=. python bench/bench_training_step.py [../shared/fixtures/official]

For each recorded case: the model output's max |difference| relative to the official output's max |value|, the
loss's relative difference, the worst gradient (max |difference| / max |official gradient| over every official
trainable tensor), the checkpointed step's worst gradient relative to the plain step's, and the wall time.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from safetensors.torch import load_file

from hallo3_cli.hub.convert import MAIN_PREFIX, REF_PREFIX, infer_config, map_official
from hallo3_cli.models import Hallo3ReferenceNet, Hallo3Transformer3DModel
from hallo3_cli.training import trainable_parameters, training_forward

CASES = {"s1": (1, False), "s1drop": (1, True), "s2": (2, False)}


def models(weights):
    built = []
    for cls, prefix, main in ((Hallo3Transformer3DModel, MAIN_PREFIX, True), (Hallo3ReferenceNet, REF_PREFIX, False)):
        model = cls(**infer_config(weights, prefix, main=main))
        model.load_state_dict({m.name: m.make() for m in map_official(weights, prefix)})
        built.append(model)
    return built


def step(weights, tensors, stage, drop, checkpointing):
    main, reference = models(weights)
    named = trainable_parameters(main, reference, stage)
    if checkpointing:
        main.enable_gradient_checkpointing()
    start = time.perf_counter()
    out = training_forward(
        main, reference, stage=stage, latents=tensors["input.x0"], noise=tensors["input.noise"],
        timestep=tensors["input.idx"], image_condition=tensors["input.image_cond_latent_frame0"],
        ref_latent=tensors["input.mask_ref_latent"], prompt_embeds=tensors["input.text_cond"],
        face_embeds=tensors["input.face_emb"], audio=tensors["input.audio_emb"] if stage == 2 else None,
        drop_text=drop, drop_reference=drop)
    out.loss.backward()
    seconds = time.perf_counter() - start
    return out, {name: p.grad for name, p in named}, seconds


def main(root: Path) -> None:
    weights = {k: v for k, v in load_file(str(root / "tiny_official.safetensors")).items()
               if k.startswith(("model.", "ref_model."))}
    tensors = load_file(str(root / "tiny_train.safetensors"))
    print("| case | checkpointing | model output | loss | worst gradient | vs plain step | s (fwd+bwd) |")
    print("|---|---|---|---|---|---|---|")
    for case, (stage, drop) in CASES.items():
        name = "tiny_train_grads_s2.safetensors" if stage == 2 else "tiny_train_grads_s1.safetensors"
        prefix = f"{case}.grad."
        official = {k[len(prefix):]: v for k, v in load_file(str(root / name)).items() if k.startswith(prefix)}
        plain = None
        for checkpointing in (False, True):
            out, grads, seconds = step(weights, tensors, stage, drop, checkpointing)
            reference = tensors[f"{case}.model_out"]
            model_rel = ((out.model_output - reference).abs().max() / reference.abs().max()).item()
            loss_rel = abs(out.loss.item() - tensors[f"{case}.loss"].item()) / tensors[f"{case}.loss"].item()
            worst = 0.0
            for label, net_prefix in (("transformer.", MAIN_PREFIX), ("reference_net.", REF_PREFIX)):
                for mapped in map_official(official, net_prefix):
                    scale = official[mapped.sources[0]].abs().max()
                    worst = max(worst, ((grads[label + mapped.name] - mapped.make()).abs().max() / scale).item())
            versus = "—"
            if plain is None:
                plain = grads
            else:
                worst_vs_plain = max(((grads[n] - g).abs().max() / g.abs().max()).item()
                                     for n, g in plain.items() if g is not None)
                versus = f"{worst_vs_plain:.1e}"
            print(f"| {case} | {'on' if checkpointing else 'off'} | {model_rel:.1e} | {loss_rel:.1e} | {worst:.1e} | "
                  f"{versus} | {seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[2] / "shared/fixtures/official")
