"""Forward time of Hallo3Transformer3DModel vs plain diffusers CogVideoXTransformer3DModel (issue 3).

Same width, heads, layers, text length and latent size, measured in one run on CPU. Hallo3 adds,
per layer, the reference keys/values (one frame of tokens, no queries) and two cross-attentions whose
query projections run over every video token (their output projections are folded into the few
context values); those are inherent. The script also prints
the analytic FLOP ratio so the measured ratio can be read against what is inherent.

    python bench/bench_transformer.py                    # defaults: 768 wide, 4 layers, 13×32×48 latent
    python bench/bench_transformer.py --width 3072 --layers 1 --height 60 --width-latent 90
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from diffusers import CogVideoXTransformer3DModel

from hallo3_cli.models import Hallo3ReferenceNet, Hallo3Transformer3DModel


def flops(width: int, layers: int, video: int, text: int, ref: int, audio_tokens: int, face_tokens: int) -> dict:
    """Multiply-adds ×2 per forward (batch 1), counting only the dominant matmuls."""
    tokens = video + text
    linear = 12 * width * width * tokens  # qkv, out, 4x MLP
    attention = 2 * tokens * tokens * width  # QK^T and AV
    ref_extra = 2 * ref * width * width + 2 * tokens * ref * width  # ref k/v projections + extra keys
    # queries over every video token; QKᵀ; the output projection folded into the (few) values
    heads, context = width // 64, audio_tokens + face_tokens
    cross = 2 * width * width * video + video * context * width * (1 + heads) + 13 * context * width * width
    base = 2 * layers * (linear + attention)
    ours = base + 2 * layers * (ref_extra + cross)
    return {"plain": base, "hallo3": ours, "ratio": ours / base}


def timed_pair(first, second, repeats: int) -> tuple[float, float]:
    """Median seconds of two functions, run alternately so that a change in machine load hits both."""
    first(), second()  # warm-up
    samples = ([], [])
    for _ in range(repeats):
        for fn, times in zip((first, second), samples):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(samples[0]), statistics.median(samples[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=768, help="hidden size (heads × 64)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--height", type=int, default=32, help="latent height")
    parser.add_argument("--width-latent", type=int, default=48, help="latent width")
    parser.add_argument("--batch", type=int, default=2, help="2 = one CFG call")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    heads = args.width // 64
    geometry = dict(sample_height=args.height, sample_width=args.width_latent, num_layers=args.layers,
                    num_attention_heads=heads, attention_head_dim=64, text_embed_dim=4096, time_embed_dim=512)
    ours = Hallo3Transformer3DModel(**geometry).eval()
    reference = Hallo3ReferenceNet(**geometry).eval()
    plain = CogVideoXTransformer3DModel(
        **geometry, in_channels=32, out_channels=16, use_rotary_positional_embeddings=True,
        use_learned_positional_embeddings=True, sample_frames=49,
    ).eval()

    b, frames, h, w = args.batch, 13, args.height, args.width_latent
    x = torch.randn(b, frames, 32, h, w)
    text = torch.randn(b, 226, 4096)
    t = torch.full((b,), 500.0)
    audio = torch.randn(b, 49, 5, 12, 768)
    face = torch.randn(b, 512)
    with torch.no_grad():
        bank = reference(hidden_states=torch.randn(1, 1, 16, h, w), encoder_hidden_states=torch.zeros(1, 226, 4096))
        audio_tokens, face_tokens = ours.project_audio(audio), ours.project_face(face)
    rope = ours.rotary_embedding(x)

    def run_ours():
        with torch.no_grad():
            ours(hidden_states=x, encoder_hidden_states=text, timestep=t, audio_tokens=audio_tokens,
                 face_tokens=face_tokens, ref_states=bank, return_dict=False)

    def run_plain():
        with torch.no_grad():
            plain(hidden_states=x, encoder_hidden_states=text, timestep=t, image_rotary_emb=rope, return_dict=False)

    video_tokens = frames * (h // 2) * (w // 2)
    plain_s, ours_s = timed_pair(run_plain, run_ours, args.repeats)
    analytic = flops(args.width, args.layers, video_tokens, 226, (h // 2) * (w // 2), 32, 4)
    print("| width | layers | tokens (text+video) | ref keys | plain diffusers s | Hallo3 s | measured ratio | FLOP ratio (inherent) | threads |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {args.width} | {args.layers} | {226 + video_tokens} | {(h // 2) * (w // 2)} | {plain_s:.2f} | {ours_s:.2f} "
          f"| {ours_s / plain_s:.3f} | {analytic['ratio']:.3f} | {torch.get_num_threads()} |")


if __name__ == "__main__":
    main()
