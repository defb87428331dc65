"""One prepared GPU check of the denoiser at production size, with random weights and no download.

Measures, on one CUDA GPU (made for an H100/H200; about 5 minutes there, budget 8):

- seconds per denoising step (``Hallo3Pipeline.guided_velocity``: one batch-2 CFG call of the main DiT) in bf16: eager,
  ``compile_repeated_blocks`` (``--compile``) and First Block Cache at 0.1 (``--cache 0.1``);
- which SDPA kernel ran (the aten op recorded by the profiler);
- peak device memory of one denoising step and of one VAE decode per offload mode (``none``, ``model``,
  ``group``, ``sequential``, placed by the renderer's own ``loading.Placement``) against ``hallo3_cli.plan.plan``'s
  prediction for the same steps;
- the bf16-vs-fp32 drift of one step (the same weights: the bf16 model upcast in place).

The networks are the package's classes at the release configuration (docs/model.md §2: 42 layers, 48 heads ×
64, latent 13 × 60 × 90; diffusers' CogVideoX VAE defaults) with random weights, so the timings are
the real ones and the outputs are noise. ``--layers K`` builds fewer layers (then the memory
comparison with the plan, which knows only the release, is reported but not meaningful). Each phase
runs in its own subprocess (clean peak-memory counters; a failing phase does not stop the others),
within ``--budget`` seconds in all.

``--scale tiny`` runs the same phases on the ``tiny-random`` preset on whatever device is there (the
test suite runs it on CPU, where device memory is not measured).

Running it on the GPU machine (Python 3.12, torch 2.11, transformers, accelerate, safetensors; no
diffusers, no registry). Where a registry is reachable::

    pip download diffusers==0.42.1 importlib_metadata zipp --no-deps -d wheels/
    pip download pillow --no-deps --only-binary=:all: --python-version 3.12 \\
        --platform manylinux2014_x86_64 -d wheels/      # only if the image lacks Pillow

then carry ``wheels/`` with the repository and run there::

    pip install --no-deps wheels/* && PYTHONPATH=. python bench/gpu_check.py > gpu_check.json

The JSON result goes to stdout, progress to stderr. A missing module is reported with this recipe.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PHASES = ("eager", "cache", "compile", "drift", "offload:none", "offload:model", "offload:group", "offload:sequential")
_WHEELS = "pip download diffusers==0.42.1 importlib_metadata zipp --no-deps -d wheels/ (see the docstring)"


def log(message: str) -> None:
    print(f"gpu_check: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# building


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def build(args, device: str, dtype):
    """(transformer, vae, preset, latent (frames, h, w)) with random weights, on ``device`` in ``dtype``."""
    import torch

    from hallo3_cli.presets import get_preset

    scale, layers = args.scale, args.layers
    if scale == "tiny":
        from hallo3_cli import loading

        preset = get_preset(args.preset)
        if not preset.is_random:
            raise SystemExit(f"--preset {args.preset} is not a random-weight preset")
        if layers is not None:
            raise SystemExit("--layers applies to --scale production only")
        model = loading.load_network(preset, "transformer", device, dtype)
        vae = loading.load_network(preset, "vae", device, dtype)
    else:
        from diffusers import AutoencoderKLCogVideoX

        from hallo3_cli.models import Hallo3Transformer3DModel

        preset = get_preset("hallo3")
        config = {} if layers is None else {"num_layers": layers}  # the class defaults are the release (docs/model.md §2)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # allocate in the compute dtype, on the device: no host copy, no cast
        try:
            with torch.device(device):
                model = Hallo3Transformer3DModel(**config)
                vae = AutoencoderKLCogVideoX(scaling_factor=preset.vae_scale)
        finally:
            torch.set_default_dtype(previous)
        with torch.no_grad():  # the learned positional table is a zero placeholder until weights load
            model.patch_embed.pos_embedding.normal_(0, 0.02)
        model = model.to(device, dtype).eval().requires_grad_(False)
        vae = vae.to(device, dtype).eval().requires_grad_(False)
    from hallo3_cli import geometry

    latent = (geometry.latent_frames(preset.clip_length), *geometry.latent_size(preset.height, preset.width))
    return model, vae, preset, latent


class CfgCall:
    """One denoising step exactly as the renderer makes it: ``Hallo3Pipeline.guided_velocity`` (the batch-2 CFG
    call of the DiT + guidance) on random inputs of the render's shapes (context, condition, audio tokens
    projected once per clip, a shared reference bank)."""

    def __init__(self, model, latent, device, dtype, seed: int = 0, _tensors: dict | None = None):
        import torch

        from hallo3_cli.pipeline_hallo3 import Hallo3Context, Hallo3Pipeline
        from hallo3_cli.scheduling_hallo3 import Hallo3DPMSolverSDEScheduler

        self.pipe = Hallo3Pipeline(transformer=model, vae=None, scheduler=Hallo3DPMSolverSDEScheduler())
        if _tensors is None:
            g = torch.Generator(device).manual_seed(seed)
            c = model.config
            frames, h, w = latent

            def randn(*shape, keep=False):
                x = torch.randn(*shape, generator=g, device=device, dtype=torch.float32)
                return x if keep else x.to(dtype)

            text = randn(1, c.max_text_seq_length, c.text_embed_dim)
            _tensors = {
                "latents": randn(1, frames, 16, h, w, keep=True),  # the sampler state is float32
                "condition": randn(1, frames, 16, h, w),
                "tokens": randn(2, frames, c.audio_context_tokens, c.audio_cross_attention_dim),
                "context": Hallo3Context(
                    text=torch.cat([torch.zeros_like(text), text]),
                    face_tokens=randn(2, c.face_tokens, c.face_cross_attention_dim),
                    uncond_audio_tokens=randn(1, frames, c.audio_context_tokens, c.audio_cross_attention_dim),
                    bank=[randn(1, h * w // c.patch_size**2, c.num_attention_heads * c.attention_head_dim)
                          for _ in range(c.num_layers)],
                ),
            }
        self.tensors = _tensors

    def __call__(self, latents=None, timestep: float = 500.0):
        import torch

        t = self.tensors
        latents = t["latents"] if latents is None else latents
        return self.pipe.guided_velocity(latents, torch.tensor(timestep), t["condition"], t["tokens"], t["context"], 3.5)

    def upcast(self, model, device):
        """The same inputs in float32 (bf16 values are exact in fp32), for ``model`` upcast in place."""
        import torch

        from hallo3_cli.pipeline_hallo3 import Hallo3Context

        def up(x):
            if isinstance(x, Hallo3Context):
                return dataclasses.replace(x, **{f.name: up(getattr(x, f.name)) for f in dataclasses.fields(x)})
            return [up(v) for v in x] if isinstance(x, list) else {k: up(v) for k, v in x.items()} if isinstance(x, dict) else x.float()

        return CfgCall(model, None, device, torch.float32, _tensors=up(self.tensors))


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def step_seconds(call: CfgCall, device, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        call()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


# ---------------------------------------------------------------------------------------------
# phases


def phase_eager(args, device, dtype) -> dict:
    import torch

    model, _, _, latent = build(args, device, dtype)
    call = CfgCall(model, latent, device, dtype)
    warm = step_seconds(call, device, 1)[0]
    times = step_seconds(call, device, args.repeats)
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = call()
    ops = sorted({e.key for e in prof.key_averages() if "scaled_dot_product" in e.key or "attention" in e.key.lower()})
    return {"first_call_s": warm, "step_s": min(times), "step_s_all": times, "sdpa_ops": ops,
            "finite": bool(torch.isfinite(out).all()), "tokens": out.shape[1] * out.shape[3] * out.shape[4] // 4}


def phase_cache(args, device, dtype) -> dict:
    """First Block Cache 0.1 over a short trajectory: the input drifts a little each step, as in sampling."""
    import torch
    from diffusers.hooks import FirstBlockCacheConfig

    model, _, _, latent = build(args, device, dtype)
    call = CfgCall(model, latent, device, dtype)
    model.enable_cache(FirstBlockCacheConfig(threshold=0.1))  # guided_velocity enters its cache context
    times = []
    x = call.tensors["latents"]
    with torch.no_grad():
        for step in range(args.repeats + 3):
            _sync(device)
            start = time.perf_counter()
            call(x * (1 - 0.002 * step), 900.0 - 20 * step)
            _sync(device)
            times.append(time.perf_counter() - start)
    return {"threshold": 0.1, "step_s_all": times, "mean_after_first_s": sum(times[1:]) / len(times[1:])}


def phase_compile(args, device, dtype) -> dict:
    model, _, _, latent = build(args, device, dtype)
    call = CfgCall(model, latent, device, dtype)
    model.compile_repeated_blocks(fullgraph=False, dynamic=False)
    start = time.perf_counter()
    step_seconds(call, device, 1)
    compile_s = time.perf_counter() - start
    times = step_seconds(call, device, args.repeats)
    return {"first_call_with_compile_s": compile_s, "step_s": min(times), "step_s_all": times}


def phase_drift(args, device, dtype) -> dict:
    """One step in bf16, then the same weights upcast to fp32 (exactly representable) on fp32 inputs."""
    import torch

    model, _, _, latent = build(args, device, torch.bfloat16)
    call = CfgCall(model, latent, device, torch.bfloat16)
    with torch.no_grad():
        low = call().float()
        model.float()
        matmul = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            high = call.upcast(model, device)()
        finally:
            torch.backends.cuda.matmul.allow_tf32 = matmul
    diff = (low - high).abs()
    return {"max_abs_diff_over_max_abs": (diff.max() / high.abs().max()).item(),
            "mean_abs_diff_over_mean_abs": (diff.mean() / high.abs().mean()).item(), "max_abs_fp32": high.abs().max().item()}


def _placement(device, dtype, offload):
    from hallo3_cli.loading import Placement
    from hallo3_cli.runtime import Runtime, dtype_name

    return Placement(Runtime(device=device, dtype=dtype_name(dtype), offload=offload))


def _predicted(preset_name: str, offload: str, device_kind: str) -> dict:
    try:
        from hallo3_cli.plan import plan
    except ImportError as err:
        return {"plan": f"not importable: {err}"}
    result = plan(preset_name, offload=offload, device_kind=device_kind, dtype="bfloat16" if device_kind == "cuda" else "float32")
    return {"plan_denoise_bytes": result.step("clip", "denoise").device_bytes,
            "plan_decode_bytes": result.step("clip", "vae-decode").device_bytes,
            "plan_peak_bytes": result.peak_device_bytes}


def phase_offload(args, device, dtype, offload: str) -> dict:
    import torch

    cuda = device.startswith("cuda")
    model, vae, preset, latent = build(args, device, dtype)  # random init is fastest on the GPU
    if offload != "none":  # the offload modes start from weights in host memory, as the renderer loads them
        model, vae = model.to("cpu"), vae.to("cpu")
        if cuda:
            torch.cuda.empty_cache()
    placement = _placement(device, dtype, offload)  # the renderer's own placement (loading.Placement)
    model = placement.place(model, "transformer")
    vae = placement.place(vae, "vae")
    call = CfgCall(model, latent, device, dtype)
    decode_frames = args.decode_frames or latent[0]
    result = {"decoded_latent_frames": decode_frames}
    with torch.no_grad():
        for name, run in (("denoise", call),
                          ("decode", lambda: vae.decode(torch.randn(1, 16, decode_frames, *latent[1:], device=device, dtype=dtype)))):
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            run()
            _sync(device)
            result[f"{name}_s"] = time.perf_counter() - start
            result[f"{name}_peak_bytes"] = torch.cuda.max_memory_allocated() if cuda else None
    predicted = _predicted(preset.name, offload, "cuda" if cuda else "cpu")
    result.update(predicted)
    if cuda and "plan_denoise_bytes" in predicted:
        result["measured_over_plan_denoise"] = result["denoise_peak_bytes"] / predicted["plan_denoise_bytes"]
        result["measured_over_plan_decode"] = result["decode_peak_bytes"] / predicted["plan_decode_bytes"]
    return result


def run_phase(args, phase: str) -> dict:
    import torch

    device = args.device or _device()
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    if phase.startswith("offload:"):
        return phase_offload(args, device, dtype, phase.split(":", 1)[1])
    return {"eager": phase_eager, "cache": phase_cache, "compile": phase_compile, "drift": phase_drift}[phase](args, device, dtype)


# ---------------------------------------------------------------------------------------------


def environment() -> dict:
    import torch

    info = {"torch": torch.__version__, "python": sys.version.split()[0], "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["gpu_memory_bytes"] = torch.cuda.get_device_properties(0).total_memory
    for name in ("diffusers", "transformers", "accelerate"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            info[name] = None
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=("production", "tiny"), default="production")
    parser.add_argument("--layers", type=int, default=None, help="fewer DiT layers than the release's 42")
    parser.add_argument("--preset", default="tiny-random", help="random-weight preset of --scale tiny")
    parser.add_argument("--decode-frames", type=int, default=None, help="latent frames per VAE decode (default: a clip's)")
    parser.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated subset of {', '.join(PHASES)}")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per phase (after one warm-up)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--budget", type=float, default=470.0, help="seconds for all phases together")
    parser.add_argument("--in-process", action="store_true", help="run the phases in this process (default for --scale tiny)")
    parser.add_argument("--phase", help=argparse.SUPPRESS)  # internal: run one phase, print its JSON
    args = parser.parse_args(argv)

    try:
        import diffusers  # noqa: F401

        import hallo3_cli.models  # noqa: F401
    except ImportError as err:
        print(f"gpu_check: {err}; carry the missing wheels: {_WHEELS}", file=sys.stderr)
        return 1
    if args.phase:
        print(json.dumps(run_phase(args, args.phase)))
        return 0

    phases = [p for p in args.phases.split(",") if p]
    unknown = sorted(set(phases) - set(PHASES))
    if unknown:
        parser.error(f"unknown phases {unknown}; choose from {', '.join(PHASES)}")
    in_process = args.in_process or args.scale == "tiny"
    report = {"scale": args.scale, "layers": args.layers or ("release" if args.scale == "production" else "preset"),
              "environment": environment(), "phases": {}}
    deadline = time.monotonic() + args.budget
    for phase in phases:
        left = deadline - time.monotonic()
        if left < 10:
            report["phases"][phase] = {"skipped": "out of time budget"}
            continue
        log(f"{phase} ...")
        start = time.perf_counter()
        if in_process:
            try:
                result = run_phase(args, phase)
            except Exception as err:  # report and go on: one failing phase must not hide the others
                result = {"error": f"{type(err).__name__}: {err}"}
        else:
            command = [sys.executable, __file__, "--phase", phase, "--scale", args.scale, "--repeats", str(args.repeats),
                       "--preset", args.preset]
            if args.decode_frames:
                command += ["--decode-frames", str(args.decode_frames)]
            if args.layers:
                command += ["--layers", str(args.layers)]
            if args.device:
                command += ["--device", args.device]
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
            try:
                done = subprocess.run(command, capture_output=True, text=True, timeout=left, env=env)
                if done.returncode == 0:
                    result = json.loads(done.stdout.strip().splitlines()[-1])
                else:
                    result = {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
            except subprocess.TimeoutExpired:
                result = {"error": f"timed out after {left:.0f} s"}
        result["wall_s"] = time.perf_counter() - start
        report["phases"][phase] = result
        log(f"{phase}: {json.dumps(result)[:300]}")
    print(json.dumps(report, indent=1))
    return 0 if all("error" not in r for r in report["phases"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
