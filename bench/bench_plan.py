"""The ``hallo3 plan`` table at production size: every memory mode of the release model (issue 6).

Predicted from the real networks traced on fake tensors (``hallo3_cli.plan``), not measured on a GPU.
Prints markdown for bench/RESULTS.md: one row per offload × weights dtype × VAE tiling, then the
per-step breakdown of the default mode and of the smallest mode that fits 24 GiB.

    python bench/bench_plan.py                        # hallo3 at 480×720, 50 steps
    python bench/bench_plan.py --height 320 --width 480 --steps 30
"""

from __future__ import annotations

import argparse
import time

from hallo3_cli.plan import OFFLOAD_MODES, format_plan, plan

GiB = 1 << 30


def gib(n: int) -> str:
    return f"{n / GiB:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="hallo3")
    parser.add_argument("--height", type=int)
    parser.add_argument("--width", type=int)
    parser.add_argument("--steps", type=int)
    args = parser.parse_args()

    start = time.perf_counter()
    plans = {}
    for offload in OFFLOAD_MODES:
        for weights in ("bf16", "fp8"):
            for tiling in (False, True):
                plans[offload, weights, tiling] = plan(args.model, offload=offload, weights_dtype=weights, vae_tiling=tiling,
                                                       height=args.height, width=args.width, steps=args.steps)
    seconds = time.perf_counter() - start
    default = plans["model", "bf16", False]  # --offload auto is model offloading on CUDA
    resident = plans["none", "bf16", False]

    print(f"## `hallo3 plan`: {default.model} at {default.height}×{default.width} (H×W), {default.steps} steps, "
          "CUDA, bf16 compute")
    print()
    print(f"Predicted, not measured (no GPU here): {len(plans)} plans in {seconds:.1f} s. Device = tensor memory as "
          "`torch.cuda.max_memory_allocated` counts it (add the CUDA context, ~0.3–1 GB, and cuDNN workspaces); "
          "host = weights and staging copies. 1 GiB = 2³⁰ bytes.")
    print()
    print(f"FLOPs: {default.flops_per_forward / 1e12:.1f} TFLOP per DiT forward at batch 2 (CFG), "
          f"{default.flops_per_clip / 1e15:.2f} PFLOP per clip of 49 frames "
          f"({default.steps} forwards + VAE encode/decode + audio projection; "
          f"{plans['model', 'bf16', True].flops_per_clip / 1e15:.2f} with VAE tiling), "
          f"{default.flops_per_video / 1e12:.1f} TFLOP once per video (reference VAE encode, T5, reference DiT).")
    print()
    print("| offload | weights | VAE tiling | peak device GiB | at | peak host GiB | at | ≤ 24 GiB | ≤ 12 GiB |")
    print("|---|---|---|---:|---|---:|---|---|---|")
    for (offload, weights, tiling), p in plans.items():
        fits24 = "yes" if p.peak_device_bytes <= 24 * GiB else "no"
        fits12 = "yes" if p.peak_device_bytes <= 12 * GiB else "no"
        print(f"| {offload} | {weights} | {'on' if tiling else 'off'} | {gib(p.peak_device_bytes)} | {p.peak_device_step} | "
              f"{gib(p.peak_host_bytes)} | {p.peak_host_step} | {fits24} | {fits12} |")
    print()
    print("Weights (GiB, bf16 / fp8 storage): " + ", ".join(
        f"{name} {gib(default.weights_bytes[name])} / {gib(plans['none', 'fp8', False].weights_bytes[name])}"
        for name in default.weights_bytes))
    print()
    # the default, everything resident (why the default offloads), and the smallest
    smallest = min(plans.values(), key=lambda p: (p.peak_device_bytes, p.peak_host_bytes))
    shown = (("the default (--offload auto = model on CUDA)", default), ("no offloading", resident),
             ("smallest device peak", smallest))
    for title, p in shown:
        if p is None:
            continue
        flags = f"--offload {p.offload} --weights-dtype {p.weights_dtype}" + (" --vae-tiling" if p.vae_tiling else "")
        print(f"### Per step, {title}: {flags}")
        print()
        print("```")
        print(format_plan(p))
        print("```")
        print()


if __name__ == "__main__":
    main()
