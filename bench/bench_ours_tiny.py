"""Our render loop at the official fixture's tiny DiT dims, to compare with the official code (issue 6).

Uses the weights and inputs of ``shared/fixtures/official/tiny_official.safetensors`` (2 layers, hidden
128, 2 heads, latent 13×16×60×90, 226 text tokens), converted with ``hallo3_cli.convert`` exactly as
``tests/conftest.py`` does, and times what a clip of ``hallo3 render`` runs:

    python bench/bench_ours_tiny.py cfg                 # reference pass + one CFG denoiser call (batch 2)
    python bench/bench_ours_tiny.py sample --steps 3    # reference pass + projections + the 3-step sampler
    python bench/bench_ours_tiny.py vae --vae-width 32 --height 128 --width 192   # a clip's VAE work

Everything runs through ``Hallo3Pipeline``'s own methods (no copy of the render here): ``cfg`` times the
reference pass (``reference_features``, once per render), the context and audio projections
(``prepare_context`` + ``project_audio``, once per render / per clip) and one ``guided_velocity`` call (DiT
forward on the CFG batch + guidance). ``sample`` times all of that plus ``denoise`` (the sampler loop with
the pipeline's scheduler), with the official run's noise draws for 3
steps so the final latent can be checked against the fixture. The last line printed is
``RESULT {json}`` with the timings (wall seconds; ``*_cpu_s``: CPU seconds of all threads), the
agreement with the fixture (max abs error / max abs value) and the process's peak RSS (VmHWM). Run each
measurement in a fresh process.

``vae`` needs no fixture: it builds the release's VAE layout (``AutoencoderKLCogVideoX``, block widths
w·(1, 2, 2, 4), 3 layers per block, 32 norm groups) at width ``--vae-width`` (release: 128) with random
weights, and times ``Hallo3Pipeline.prepare_condition`` (encode of [image, 2 masked motion frames]) and
``decode_latents`` (13 latent frames → 49 frames) at ``--height`` × ``--width`` pixels.
``--compare FILE`` also checks against a safetensors file holding ``raw``/``guided`` (cfg) or ``final``
(sample) from another implementation.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from hallo3_cli import sampler
from hallo3_cli.hub import convert_checkpoint
from hallo3_cli.loading import PipelineLoader
from hallo3_cli.models import Hallo3ReferenceNet, Hallo3Transformer3DModel
from hallo3_cli.pipeline_hallo3 import Hallo3Pipeline, Hallo3Reference
from hallo3_cli.presets import Preset
from hallo3_cli.runtime import Runtime
from hallo3_cli.scheduling_hallo3 import Hallo3DPMSolverSDEScheduler

SHARED = Path(os.environ.get("HALLO3_SHARED", Path(__file__).resolve().parents[2] / "shared"))
CFG_SCALE = 3.5


def peak_rss_mb() -> float:
    """Peak resident set size of this process (VmHWM), in MiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def load_converted(fixture: dict, workdir: Path) -> tuple[Hallo3Transformer3DModel, Hallo3ReferenceNet]:
    """The fixture's official weights written as an official checkpoint, converted and loaded."""
    weights = {k: v for k, v in fixture.items() if k.startswith(("model.", "ref_model."))}
    (workdir / "ckpt" / "1").mkdir(parents=True)
    (workdir / "ckpt" / "latest").write_text("1\n")
    torch.save({"module": weights, "iteration": 1}, workdir / "ckpt" / "1" / "mp_rank_00_model_states.pt")
    folders = convert_checkpoint(workdir / "ckpt", workdir / "diffusers")
    main = Hallo3Transformer3DModel.from_pretrained(folders["transformer"]).eval()
    reference = Hallo3ReferenceNet.from_pretrained(folders["reference"]).eval()
    return main, reference


class TinyClip:
    """The fixture's inputs and a ``Hallo3Pipeline`` around the converted fixture networks."""

    def __init__(self, fixture: dict, main: Hallo3Transformer3DModel, reference: Hallo3ReferenceNet):
        self.pipe = Hallo3Pipeline(transformer=main, vae=None, scheduler=Hallo3DPMSolverSDEScheduler(), reference_net=reference)
        self.text = fixture["input.text_cond"]
        self.audio, self.face = fixture["input.audio_emb"], fixture["input.face_emb"]
        self.ref_latent = fixture["input.ref_latent"]
        self.x = fixture["input.noisy_latent"]
        frames = self.x.shape[1]
        padding = torch.zeros(1, frames - 1, *self.x.shape[2:])
        self.concat = torch.cat([fixture["input.concat_latent_frame0"], padding], dim=1)
        self.bank = self.context = self.audio_tokens = None

    def reference_pass(self) -> None:
        self.bank = self.pipe.reference_features(self.ref_latent, self.text[0])

    def project(self) -> None:
        identity = Hallo3Reference(
            image=torch.zeros(3, 1, 1), ref_latent=self.ref_latent[0, 0], face_embedding=self.face[0],
            face_box=torch.zeros(4, dtype=torch.int32), prompt_embeds=self.text[0], ref_bank=self.bank, framing="crop",
            source_width=1, source_height=1, face_found=True, prompt="",
        )
        self.context = self.pipe.prepare_context(identity)
        self.audio_tokens = self.pipe.project_audio(self.audio, self.context)

    def denoise(self, x_t: torch.Tensor, t: float) -> torch.Tensor:
        """One CFG denoiser call: the pipeline's ``guided_velocity``."""
        return self.pipe.guided_velocity(x_t, torch.tensor(t), self.concat, self.audio_tokens, self.context, CFG_SCALE)


def bench_cfg(clip: TinyClip, fixture: dict, official: Path, repeats: int, warmup: int) -> dict:
    schedule = sampler.schedule(50)  # step 0: t = 999, alpha = 0 (any step count)
    t, alpha = float(schedule.timesteps[0]), schedule.denoiser_alphas[0]
    times: dict[str, list[float]] = {"ref_pass_s": [], "projections_s": [], "cfg_call_s": [], "cfg_call_cpu_s": []}
    velocity = None
    for run in range(warmup + repeats):
        start = time.perf_counter()
        clip.reference_pass()
        after_ref = time.perf_counter()
        clip.project()
        after_projections, cpu_start = time.perf_counter(), time.process_time()
        velocity = clip.denoise(clip.x, t)
        end, cpu_end = time.perf_counter(), time.process_time()
        if run >= warmup:
            times["ref_pass_s"].append(after_ref - start)
            times["projections_s"].append(after_projections - after_ref)
            times["cfg_call_s"].append(end - after_projections)
            times["cfg_call_cpu_s"].append(cpu_end - cpu_start)
    sample3 = load_file(str(official / "tiny_sample3.safetensors"))
    guided = sampler.v_to_x0(clip.x, velocity, alpha)  # the scheduler's v → x0 at the snapped alpha
    agreement = {
        "guided_vs_fixture_rel": relative_error(guided, sample3["step0.guided_denoised"]),
        "bank_vs_fixture_rel": max(relative_error(entry, fixture[f"bank.layer{i}"][0]) for i, entry in enumerate(clip.bank)),
    }
    return {**times, **agreement, "outputs": {"guided": guided}}


def bench_sample(clip: TinyClip, official: Path, steps: int, repeats: int, warmup: int) -> dict:
    sample3 = load_file(str(official / "tiny_sample3.safetensors"))
    times, cpu_times, final = [], [], None
    for run in range(warmup + repeats):
        noise, generator = None, torch.Generator().manual_seed(1234)
        if steps == 3:
            noise = [[sample3["noise0"]], [sample3["noise1"], sample3["noise2"]], None]  # the official run's draws
        start, cpu_start = time.perf_counter(), time.process_time()
        clip.reference_pass()
        clip.project()
        final = clip.pipe.denoise(clip.concat, clip.audio, clip.context, generator, steps, CFG_SCALE, latents=clip.x, noise=noise)
        if run >= warmup:
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
    result = {"sample_s": times, "sample_cpu_s": cpu_times, "outputs": {"final": final}}
    if steps == 3:
        result["final_vs_fixture_rel"] = relative_error(final, sample3["final_latent"])
    return result


def bench_vae(vae_width: int, height: int, width: int, repeats: int, warmup: int) -> dict:
    table = {
        "seed": 0, "height": height, "width": width, "fps": 25, "clip_length": 49, "motion_frames": 2,
        "steps": 50, "cfg": CFG_SCALE, "vae_scale": 0.7, "text_length": 226, "default_prompt": "",
        "vae": {
            "block_out_channels": [vae_width * m for m in (1, 2, 2, 4)], "layers_per_block": 3, "norm_num_groups": 32,
        },
    }
    pipe = PipelineLoader(Preset("bench-vae", table), Runtime(device="cpu", dtype="float32")).need("vae")
    vae = pipe.vae
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(3, height, width, generator=generator) * 2 - 1
    motion = torch.rand(2, 3, height, width, generator=generator) * 2 - 1
    latents = torch.randn(1, 13, 16, height // 8, width // 8, generator=generator)
    times: dict[str, list[float]] = {"encode_s": [], "decode_s": []}
    frames = None
    for run in range(warmup + repeats):
        start = time.perf_counter()
        pipe.prepare_condition(image, motion, generator)
        after_encode = time.perf_counter()
        frames = pipe.decode_latents(latents)
        if run >= warmup:
            times["encode_s"].append(after_encode - start)
            times["decode_s"].append(time.perf_counter() - after_encode)
    parameters = {
        "params_encoder": sum(p.numel() for p in vae.encoder.parameters()),
        "params_decoder": sum(p.numel() for p in vae.decoder.parameters()),
    }
    return {**times, **parameters, "video_shape": list(frames.shape), "outputs": {}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["cfg", "sample", "vae"])
    parser.add_argument("--steps", type=int, default=3, help="sampler steps (sample mode)")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs in this process")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs first")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--vae-width", type=int, default=32, help="VAE base width (vae mode; release: 128)")
    parser.add_argument("--height", type=int, default=128, help="frame height (vae mode)")
    parser.add_argument("--width", type=int, default=192, help="frame width (vae mode)")
    parser.add_argument("--compare", type=Path, help="safetensors with another implementation's outputs")
    parser.add_argument("--save", type=Path, help="write our outputs (raw/guided or final) here")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    if args.mode == "vae":
        result = bench_vae(args.vae_width, args.height, args.width, args.repeats, args.warmup)
        rss_loaded = None
    else:
        official = SHARED / "fixtures" / "official"
        if not (official / "tiny_official.safetensors").exists():
            parser.error(f"the official fixtures are not in {official} (set HALLO3_SHARED)")
        fixture = load_file(str(official / "tiny_official.safetensors"))
        with tempfile.TemporaryDirectory() as tmp:
            main_model, reference = load_converted(fixture, Path(tmp))
        clip = TinyClip(fixture, main_model, reference)
        rss_loaded = peak_rss_mb()
        if args.mode == "cfg":
            result = bench_cfg(clip, fixture, official, args.repeats, args.warmup)
        else:
            result = bench_sample(clip, official, args.steps, args.repeats, args.warmup)
    outputs = result.pop("outputs")
    if args.compare is not None:
        other = load_file(str(args.compare))
        for name, tensor in outputs.items():
            if name in other:
                result[f"{name}_vs_compare_rel"] = relative_error(tensor, other[name])
    if args.save is not None:
        save_file({k: v.contiguous() for k, v in outputs.items()}, str(args.save))

    result.update(
        mode=args.mode, steps=args.steps, threads=args.threads, rss_after_load_mb=rss_loaded, peak_rss_mb=peak_rss_mb()
    )
    for key, value in result.items():
        if isinstance(value, list):
            print(f"{key:>24}: median {statistics.median(value):.3f}  ({', '.join(f'{v:.3f}' for v in value)})")
        else:
            print(f"{key:>24}: {value}")
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
