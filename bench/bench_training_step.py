"""How close the training step is to the official one (tiny_train.*), with and without gradient checkpointing; and
how long it takes against a plain diffusers ``CogVideoXTransformer3DModel`` forward + backward of equal dimensions.

    PYTHONPATH=. python bench/bench_training_step.py [../shared/fixtures/official]
    PYTHONPATH=. python bench/bench_training_step.py --versus-diffusers [--width 768 --layers 2 --stage 1]

For each recorded case: the model output's max |difference| relative to the official output's max |value|, the
loss's relative difference, the worst gradient (max |difference| / max |official gradient| over every official
trainable tensor), the checkpointed step's worst gradient relative to the plain step's, and the wall time.

``--versus-diffusers``: our training step (``training_loss`` + ``backward``: the reference DiT, the main DiT with
face (and in stage 2 audio) conditioning, per-block checkpointing in the main DiT, the stage's trainable set) against
diffusers' CogVideoX transformer at the same width, heads, layers, text length and latent, with per-block
checkpointing too, its attention projections trainable (the part of stage 1's set it has), an MSE loss to a target
and ``backward``. float32 on the CPU, batch 1; the two run alternately (median of the repeats after a warm-up), and
both are traced once for FLOPs (``hallo3_cli.tracing``, the plan's counter) so the measured ratio can be read
against the FLOP ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from hallo3_cli.hub.convert import MAIN_PREFIX, REF_PREFIX, infer_config, map_official
from hallo3_cli.models import Hallo3ReferenceNet, Hallo3Transformer3DModel
from hallo3_cli.training import trainable_parameters, training_forward, training_loss

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


def versus_diffusers(width: int, layers: int, height: int, latent_width: int, stage: int, repeats: int) -> None:
    from diffusers import CogVideoXTransformer3DModel

    from hallo3_cli import tracing
    from hallo3_cli.models import Hallo3ReferenceNet, Hallo3Transformer3DModel

    torch.manual_seed(0)
    geometry = dict(sample_height=height, sample_width=latent_width, num_layers=layers, num_attention_heads=width // 64,
                    attention_head_dim=64, text_embed_dim=4096, time_embed_dim=512)
    main = Hallo3Transformer3DModel(**geometry).train()
    reference = Hallo3ReferenceNet(**geometry).train()
    trainable_parameters(main, reference, stage)
    main.enable_gradient_checkpointing()
    plain = CogVideoXTransformer3DModel(**geometry, in_channels=32, out_channels=16, use_rotary_positional_embeddings=True,
                                        use_learned_positional_embeddings=True, sample_frames=49).train()
    plain.requires_grad_(False)
    for name, p in plain.named_parameters():
        p.requires_grad_(".attn1.to_" in name)  # the attention projections, as stage 1 trains them in ours
    plain.enable_gradient_checkpointing()

    frames = 13
    x0 = torch.randn(1, frames, 16, height, latent_width)
    noise = torch.randn_like(x0)
    text = torch.randn(1, 226, 4096)
    inputs = dict(latents=x0, noise=noise, timestep=500, image_condition=torch.randn(1, 1, 16, height, latent_width),
                  ref_latent=torch.randn(1, 1, 16, height, latent_width), prompt_embeds=text,
                  face_embeds=torch.randn(1, 512), audio=torch.randn(1, 49, 5, 12, 768) if stage == 2 else None)
    rope = main.rotary_embedding(x0)
    hidden = torch.randn(1, frames, 32, height, latent_width)

    def ours():
        main.zero_grad(set_to_none=True)
        reference.zero_grad(set_to_none=True)
        training_loss(main, reference, stage=stage, **inputs).backward()

    def theirs():
        plain.zero_grad(set_to_none=True)
        out = plain(hidden_states=hidden, encoder_hidden_states=text, timestep=torch.full((1,), 500.0),
                    image_rotary_emb=rope, return_dict=False)[0]
        (out.float() - noise).square().mean().backward()

    flops = []
    for fn in (theirs, ours):
        with tracing.session({}, 64) as tracer:
            fn()
        flops.append(tracer.flops)
    fn_times = ([], [])
    theirs(), ours()  # warm-up
    for _ in range(repeats):
        for fn, times in zip((theirs, ours), fn_times):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    plain_s, ours_s = statistics.median(fn_times[0]), statistics.median(fn_times[1])
    tokens = frames * (height // 2) * (latent_width // 2) + 226
    print("| stage | width | layers | tokens (text+video) | plain diffusers fwd+bwd s | Hallo3 step s | measured ratio | "
          "FLOP ratio | threads |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {stage} | {width} | {layers} | {tokens} | {plain_s:.2f} | {ours_s:.2f} | {ours_s / plain_s:.3f} | "
          f"{flops[1] / flops[0]:.3f} | {torch.get_num_threads()} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("fixtures", nargs="?", type=Path,
                        default=Path(__file__).resolve().parents[2] / "shared/fixtures/official")
    parser.add_argument("--versus-diffusers", action="store_true")
    parser.add_argument("--width", type=int, default=768, help="hidden size (heads × 64)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--height", type=int, default=32, help="latent height")
    parser.add_argument("--width-latent", type=int, default=48, help="latent width")
    parser.add_argument("--stage", type=int, default=1, choices=(1, 2))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.versus_diffusers:
        versus_diffusers(args.width, args.layers, args.height, args.width_latent, args.stage, args.repeats)
    else:
        main(args.fixtures)
