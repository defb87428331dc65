"""The ``hallo3`` command line: a thin Typer shell over the library.

Heavy modules (torch, diffusers, transformers, av) are imported inside the commands so that
``hallo3 --help`` and ``hallo3 --version`` stay instant. Results go to stdout, logs and progress to
stderr; errors are one line with a non-zero exit code (``--debug`` shows the traceback).
"""

from __future__ import annotations

import logging
import math
import os
import re
import signal
import sys
from pathlib import Path
from typing import List, Optional

import typer

from hallo3_cli import options
from hallo3_cli.version import __version__
from hallo3_cli.errors import Hallo3Error, reason
from hallo3_cli.runtime import (DEVICE_KINDS, DTYPE_CHOICES, OFFLOAD_CHOICES, PARALLEL_MODES, TRAIN_ENGINES,
                               WEIGHTS_DTYPE_CHOICES)

app = typer.Typer(
    name="hallo3",
    help="Hallo3 talking-portrait video from one image and one speech recording.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)

MODEL_HELP = ("Model preset from models.toml: 'hallo3' (the release) or 'tiny-random' (offline test model, output is "
              "noise); or the path of a model folder (e.g. one 'hallo3 train' exported).")


OFFLOAD_HELP = ("Memory mode: auto (on CUDA the fastest mode whose plan fits the free memory; elsewhere none), none (all on the device), model (each network on the "
                "device only while it runs), group (one DiT block at a time), sequential (one layer at a time; slowest, least memory).")
PARALLEL_HELP = ("Under torchrun: jobs (each process renders its share of the --batch jobs), video (every process "
                 "shares each denoising step of one video: launch with `torchrun --nproc-per-node N --no-python "
                 "hallo3 render ... --parallel video`), none (each process renders on its own). auto: jobs with "
                 "--batch, none otherwise.")
WEIGHTS_HELP = "DiT weight storage: auto (= --dtype), bf16, or fp8 (float8 storage, computed in --dtype; ~half the memory)."


def _runtime(device="auto", dtype="auto", offload="auto", weights_dtype="auto", vae_tiling=False, compile=False, cache=None):
    from hallo3_cli.runtime import Runtime

    try:
        return Runtime(device=device, dtype=dtype, offload=offload, weights_dtype=weights_dtype, vae_tiling=vae_tiling,
                       compile=compile, cache=cache)
    except Hallo3Error as err:  # a combination of options that cannot work (e.g. --compile with group offloading)
        raise typer.BadParameter(str(err)) from None


# --------------------------------------------------------------------------------------------
# option validation: every value is checked while parsing, before any work (bad values are usage
# errors, exit 2). The lists are runtime's (importable without torch, so --help stays instant).

WEIGHTS_CHOICES = WEIGHTS_DTYPE_CHOICES
DEVICE_KIND_CHOICES = DEVICE_KINDS


def _one_of(*choices: str):
    """Callback: the value must be one of ``choices``."""

    def check(value):
        if value is not None and value not in choices:
            raise typer.BadParameter(f"{value!r} is not one of {', '.join(choices)}")
        return value

    return check


def _number(low: float | None = None, high: float | None = None, *, low_open: bool = False, high_open: bool = False,
            multiple: int | None = None):
    """Callback for every numeric option: finite (no nan/inf), within ``low``..``high`` (an open end
    excludes the bound itself) and, with ``multiple``, a multiple of it."""

    def check(value):
        if value is None:
            return value
        if isinstance(value, float) and not math.isfinite(value):
            raise typer.BadParameter(f"must be a finite number, got {value}")
        too_low = low is not None and (value < low or (low_open and value == low))
        too_high = high is not None and (value > high or (high_open and value == high))
        if too_low or too_high:
            left = "(" if low_open else "["
            right = ")" if high_open else "]"
            raise typer.BadParameter(f"must be in {left}{'-inf' if low is None else low}, {'inf' if high is None else high}{right}, got {value}")
        if multiple is not None and value % multiple:
            raise typer.BadParameter(f"must be a multiple of {multiple}, got {value}")
        return value

    return check


def _lora(value):
    """Callback: ``PATH[:SCALE]`` of LoRA adapters (``hallo3 train --lora``'s output); the file is checked here."""
    if value is None:
        return value
    from hallo3_cli.loading import LoraWeights

    try:
        return LoraWeights.parse(value)
    except Hallo3Error as err:
        if err.exit_code == 2:
            raise typer.BadParameter(str(err)) from None
        raise


LORA_HELP = ("LoRA adapters of a fine-tuned run: PATH[:SCALE], PATH the run's pytorch_lora_weights.safetensors or "
             "the folder holding it (and reference_lora_weights.safetensors if the reference network was adapted); "
             "SCALE 0 to 10, default 1.")


def _interconnect(value):
    """Callback: ``nvlink``, ``pcie`` or a one-way bandwidth in GB/s (returned as bytes/s)."""
    if value is None or value in ("nvlink", "pcie"):
        return value
    try:
        gbps = float(value)
    except ValueError:
        gbps = float("nan")
    if not (math.isfinite(gbps) and gbps > 0):
        raise typer.BadParameter(f"{value!r} is not nvlink, pcie or a positive bandwidth in GB/s")
    low, high = INTERCONNECT_GBPS
    if not low <= gbps <= high:  # (1e300 GB/s overflowed to an infinite bandwidth in the JSON)
        raise typer.BadParameter(f"a bandwidth must be from {low:g} to {high:g} GB/s, got {value}")
    return gbps * 1e9


#: The bandwidths ``--interconnect`` accepts, in GB/s (1 MB/s to 1 PB/s: every link that exists, with room).
INTERCONNECT_GBPS = (1e-3, 1e6)


def _model(value):
    """Callback: a known preset (models.toml and $HALLO3_PRESETS), or a model folder (with a model_index.json)."""
    if value is None:
        return value
    from hallo3_cli.presets import is_model_folder, preset_names

    try:
        names = preset_names()
    except Hallo3Error as err:
        raise typer.BadParameter(str(err)) from None
    if value not in names and not is_model_folder(value):
        raise typer.BadParameter(f"unknown model preset {value!r}; known presets: {', '.join(names)} "
                                 "(or the path of a model folder with a model_index.json)")
    return value


_DEVICE = re.compile(r"[a-z][a-z_]*(:[0-9]+)?")


def _device(value):
    """Callback: a torch device string (whether it exists here is checked when it is used)."""
    if value in (None, "auto", "cpu"):
        return value
    if not _DEVICE.fullmatch(value):
        raise typer.BadParameter(f"{value!r} is not a device; use auto, cpu, cuda, cuda:N or mps")
    import torch

    try:
        torch.device(value)
    except (RuntimeError, ValueError):
        raise typer.BadParameter(f"{value!r} is not a torch device type; use auto, cpu, cuda, cuda:N or mps") from None
    return value


def _frame_fits(model: str, height: int | None, width: int | None) -> None:
    """``plan --height/--width``: at most the preset's frame area (its DiT's positional table), a usage error."""
    if height is None and width is None:
        return
    from hallo3_cli.presets import get_preset

    preset = get_preset(model)
    h, w = height or preset.height, width or preset.width
    if h * w > preset.height * preset.width:
        raise typer.BadParameter(f"{w}×{h} is larger than the {preset.name} model's {preset.width}×{preset.height} frame "
                                 "(its positional table covers that many tokens); the frame area may be at most "
                                 f"{preset.height * preset.width} pixels", param_hint="--height/--width")


def _loading_torch() -> None:
    """Say why nothing else is said for a few seconds: importing torch and diffusers (measured: ~5-8 s on 2 cores)."""
    if "diffusers" not in sys.modules:
        logging.getLogger("hallo3").info("loading torch and diffusers...")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"hallo3-cli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
    debug: bool = typer.Option(False, "--debug", envvar="HALLO3_DEBUG", help="Show full tracebacks on errors."),
) -> None:
    """(``--debug`` is read by :func:`main` before the command runs.)"""


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (test runners swap and close it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def _setup(quiet: bool) -> None:
    """Logs to stderr: warnings always, progress information unless --quiet."""
    logger = logging.getLogger("hallo3")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("hallo3: %(levelname)s: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.WARNING if quiet else logging.INFO)


def emit(result: str | Path) -> None:
    """Print a command's result (an output path) to stdout (in a ``--parallel video`` render: rank 0 only)."""
    if "RANK" in os.environ:
        from hallo3_cli.jobs.parallel_session import prints_results

        if not prints_results():
            return
    print(str(result), flush=True)


# --------------------------------------------------------------------------------------------
# commands


@app.command("download")
def download_cmd(
    model: str = typer.Option("hallo3", "--model", "-m", help=MODEL_HELP, callback=_model),
    dest: Optional[Path] = typer.Option(None, "--dest", help="Model home to install into (default: $HALLO3_HOME or the Hugging Face cache)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print what would be fetched and the total size, fetch nothing."),
    from_dir: Optional[Path] = typer.Option(None, "--from", help="Import an existing official pretrained_models/ folder (no network)."),
    component: Optional[list[str]] = typer.Option(None, "--component", help="Only this component (repeatable), e.g. --component syncnet --component face_analysis (what hallo3 eval needs)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress or logs on stderr."),
) -> None:
    """Fetch and convert the weights listed in models.toml (resumable; a second run does nothing).

    Example: hallo3 download --dry-run
    """
    _setup(quiet)
    from hallo3_cli.hub import download

    report = download(model, dest=dest, dry_run=dry_run, from_dir=from_dir, progress=not quiet, components=component or None)
    if dry_run:
        print(report)
        return
    emit(report.home)
    if report.missing:
        raise typer.Exit(1)


@app.command("doctor")
def doctor_cmd(
    model: str = typer.Option("hallo3", "--model", "-m", help=MODEL_HELP, callback=_model),
    device: str = typer.Option("auto", "--device", callback=_device, help="torch device to check: auto, cpu, cuda, cuda:1, mps."),
    dtype: str = typer.Option("auto", "--dtype", callback=_one_of(*DTYPE_CHOICES), help="auto (bfloat16 on CUDA, else float32), float32, bfloat16, float16."),
    json_output: bool = typer.Option(False, "--json", help="Print the report as one JSON object."),
) -> None:
    """Check torch, devices, installed weights, disk space, and whether the settings fit the device.

    Example: hallo3 doctor --device cuda
    """
    _setup(False)
    _loading_torch()
    from hallo3_cli.doctor import doctor, format_doctor

    report = doctor(model, device=device, dtype=dtype)
    if json_output:
        import json

        print(json.dumps(report))
    else:
        print(format_doctor(report))


@app.command("convert")
def convert_cmd(
    src: Path = typer.Argument(..., help="Official checkpoint: folder with 'latest', a .pt file, or a .safetensors file."),
    dest: Path = typer.Argument(..., help="Folder that receives transformer/ and reference/ (diffusers layout)."),
    audio_layers: int = typer.Option(12, "--audio-layers", callback=_number(1, 1000), help="wav2vec layers the audio projection expects (not inferable from shapes)."),
    shard_size: float = typer.Option(2.0, "--shard-size", callback=_number(0, 1024, low_open=True), help="Shard size in GB."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress on stderr."),
) -> None:
    """Convert an official Hallo3 checkpoint into diffusers folders.

    Example: hallo3 convert pretrained_models/hallo3 ./hallo3-diffusers
    """
    _setup(quiet)
    from hallo3_cli.hub import convert_checkpoint

    overrides = {"audio_layers": audio_layers} if audio_layers != 12 else None
    convert_checkpoint(src, dest, overrides=overrides, shard_bytes=int(shard_size * 1024**3), progress=not quiet)
    emit(dest)


@app.command("plan")
def plan_cmd(
    model: str = typer.Option("hallo3", "--model", "-m", help=MODEL_HELP, callback=_model),
    offload: str = typer.Option("auto", "--offload", callback=_one_of(*OFFLOAD_CHOICES), help=OFFLOAD_HELP),
    weights_dtype: str = typer.Option("auto", "--weights-dtype", callback=_one_of(*WEIGHTS_CHOICES), help=WEIGHTS_HELP),
    vae_tiling: bool = typer.Option(False, "--vae-tiling", help="Tiled VAE encode/decode."),
    steps: Optional[int] = typer.Option(None, "--steps", callback=_number(*options.STEPS), help="Sampling steps (default: the preset's)."),
    height: Optional[int] = typer.Option(None, "--height", callback=_number(16, 8192, multiple=16), help="Frame height, a multiple of 16 (default: the preset's, 480; height × width at most the preset's frame area)."),
    width: Optional[int] = typer.Option(None, "--width", callback=_number(16, 8192, multiple=16), help="Frame width, a multiple of 16 (default: the preset's, 720; height × width at most the preset's frame area)."),
    device_kind: str = typer.Option("cuda", "--device-kind", callback=_one_of(*DEVICE_KIND_CHOICES), help="cuda (bf16) or cpu (float32, device = host memory)."),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON object (peak_device_bytes, peak_host_bytes, flops_per_clip, ...; with --gpus also gpus, comm_bytes_per_step, predicted_speedup)."),
    gpus: Optional[int] = typer.Option(None, "--gpus", callback=_number(1, 4096), help="Plan one video on N GPUs (render --parallel video): memory and FLOPs per rank, bytes sent per denoising step, predicted speed-up. With --train: the data-parallel GPUs the training state is split over."),
    interconnect: Optional[str] = typer.Option(None, "--interconnect", callback=_interconnect, help="With --gpus: nvlink (450 GB/s one way, the default), pcie (25 GB/s) or a bandwidth in GB/s."),
    cfg_parallel: Optional[bool] = typer.Option(None, "--cfg-parallel/--no-cfg-parallel", help="With --gpus: as render --parallel video."),
    ulysses: Optional[int] = typer.Option(None, "--ulysses", callback=_number(1, 4096), help="With --gpus: as render --parallel video."),
    ring: Optional[int] = typer.Option(None, "--ring", callback=_number(1, 4096), help="With --gpus: as render --parallel video."),
    train: bool = typer.Option(False, "--train", help="Plan one training step instead (per-GPU memory and FLOPs; needs --stage)."),
    stage: Optional[int] = typer.Option(None, "--stage", callback=_number(1, 2), help="With --train: training stage, 1 (identity) or 2 (audio)."),
    lora: Optional[int] = typer.Option(None, "--lora", callback=_number(1, 4096), help="With --train: LoRA adapters of this rank instead of the stage's full trainable set."),
    engine: Optional[str] = typer.Option(None, "--engine", callback=_one_of(*TRAIN_ENGINES), help="With --train: ddp (default with --lora), zero2 (DeepSpeed ZeRO-2) or fsdp2 (default otherwise)."),
    gpu_memory: Optional[float] = typer.Option(None, "--gpu-memory", callback=_number(0, 1 << 20, low_open=True), help="With --train: also judge a card of this many GiB (besides 24, 48, 80)."),
) -> None:
    """Predict peak device and host memory and FLOPs per clip, from the real model traced without memory.

    \b
    Examples:
      hallo3 plan --offload group --vae-tiling --json
      hallo3 plan --gpus 8 --interconnect pcie
      hallo3 plan --train --stage 1 --gpus 8 --engine zero2
      hallo3 plan --train --stage 2 --lora 64
    """
    _setup(False)
    if train:
        inference_only = {"--offload": offload != "auto", "--weights-dtype": weights_dtype != "auto",
                          "--vae-tiling": vae_tiling, "--steps": steps is not None, "--device-kind": device_kind != "cuda",
                          "--interconnect": interconnect is not None, "--cfg-parallel": cfg_parallel is not None,
                          "--ulysses": ulysses is not None, "--ring": ring is not None}
        given = [name for name, used in inference_only.items() if used]
        if given:
            raise typer.BadParameter(f"{', '.join(given)} plan a render, not a training step", param_hint="--train")
        if stage is None:
            raise typer.BadParameter("--train needs --stage 1 or 2", param_hint="--stage")
        _frame_fits(model, height, width)
        _loading_torch()
        from hallo3_cli.training.plan import format_training_plan, plan_training

        result = plan_training(stage, lora_rank=lora, gpus=gpus or 1, engine=engine, gpu_memory=gpu_memory,
                               height=height, width=width, model=model, progress=True)
        print(result.to_json() if json_output else format_training_plan(result))
        return
    if stage is not None or lora is not None or engine is not None or gpu_memory is not None:
        raise typer.BadParameter("--stage, --lora, --engine and --gpu-memory need --train", param_hint="--train")
    if gpus is None and (interconnect is not None or cfg_parallel is not None or ulysses is not None or ring is not None):
        raise typer.BadParameter("--interconnect, --cfg-parallel, --ulysses and --ring need --gpus", param_hint="--gpus")
    _frame_fits(model, height, width)
    _loading_torch()
    from hallo3_cli.plan import format_plan, plan, plan_parallel

    result = plan(model, offload=offload, weights_dtype=weights_dtype, vae_tiling=vae_tiling, height=height,
                  width=width, steps=steps, device_kind=device_kind, progress=True)
    if gpus is not None:
        result = plan_parallel(result, gpus, interconnect=interconnect or "nvlink", cfg_parallel=cfg_parallel,
                               ulysses=ulysses, ring=ring)
    print(result.to_json() if json_output else format_plan(result))


@app.command("embed-audio")
def embed_audio_cmd(
    speech: Path = typer.Argument(..., help="Speech recording (wav, mp3, m4a, flac, ogg)."),
    output: Path = typer.Option(..., "--output", "-o", help="Features file to write (.safetensors)."),
    model: str = typer.Option("hallo3", "--model", "-m", help=MODEL_HELP, callback=_model),
    separate_vocals: bool = typer.Option(False, "--separate-vocals", help="Isolate the voice with the release's MDX-Net model first."),
    device: str = typer.Option("auto", "--device", callback=_device, help="torch device: auto, cpu, cuda, cuda:1, mps."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress or logs on stderr."),
) -> None:
    """Speech -> per-frame wav2vec features (a stage file).

    Example: hallo3 embed-audio speech.wav -o speech.audio.safetensors
    """
    _setup(quiet)
    from hallo3_cli.jobs import embed_audio

    emit(embed_audio(speech, output, model=model, separate_vocals=separate_vocals, device=device, progress=not quiet))


@app.command("encode-ref")
def encode_ref_cmd(
    image: Path = typer.Argument(..., help="Portrait image (jpg, png, webp, ...)."),
    output: Path = typer.Option(..., "--output", "-o", help="Reference file to write (.safetensors)."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="Scene description (default: the preset's generic talking-head prompt)."),
    model: str = typer.Option("hallo3", "--model", "-m", help=MODEL_HELP, callback=_model),
    preview: Optional[Path] = typer.Option(None, "--preview", help="Also write the framed image with face box and mask drawn (PNG)."),
    device: str = typer.Option("auto", "--device", callback=_device, help="torch device: auto, cpu, cuda, cuda:1, mps."),
    dtype: str = typer.Option("auto", "--dtype", callback=_one_of(*DTYPE_CHOICES), help="auto (bfloat16 on CUDA, else float32), float32, bfloat16, float16."),
    offload: str = typer.Option("auto", "--offload", callback=_one_of(*OFFLOAD_CHOICES), help=OFFLOAD_HELP),
    weights_dtype: str = typer.Option("auto", "--weights-dtype", callback=_one_of(*WEIGHTS_CHOICES), help=WEIGHTS_HELP),
    lora: Optional[str] = typer.Option(None, "--lora", callback=_lora, help=LORA_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress or logs on stderr."),
) -> None:
    """Portrait -> identity: face embedding and mask, VAE latents, prompt, reference features.

    Example: hallo3 encode-ref face.png -o face.ref.safetensors --preview framing.png
    """
    _setup(quiet)
    from hallo3_cli.jobs import encode_reference

    emit(encode_reference(image, output, model=model, prompt=prompt, preview=preview,
                          runtime=_runtime(device, dtype, offload, weights_dtype), lora=lora))


@app.command("render")
def render_cmd(
    face: Optional[Path] = typer.Argument(None, help="Portrait image (or use --ref)."),
    speech: Optional[Path] = typer.Argument(None, help="Speech recording (or use --audio)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Output: .mp4 (with FACE SPEECH) or .safetensors clips (with --audio/--ref)."),
    audio: Optional[Path] = typer.Option(None, "--audio", help="Audio features file from 'hallo3 embed-audio'."),
    ref: Optional[Path] = typer.Option(None, "--ref", help="Reference file from 'hallo3 encode-ref'."),
    batch: Optional[Path] = typer.Option(None, "--batch", help="Jobs file: lines 'prompt@@image@@audio' (paths relative to the file)."),
    out_dir: Optional[Path] = typer.Option(None, "--out-dir", help="Output folder for --batch (created if missing)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help=MODEL_HELP + " Default: hallo3, or the preset of --audio/--ref.", callback=_model),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="Scene description (default: the preset's generic prompt)."),
    seed: int = typer.Option(42, "--seed", help="Random seed; the same seed gives the same frames."),
    steps: Optional[int] = typer.Option(None, "--steps", callback=_number(*options.STEPS), help="Sampling steps (default: the preset's; 50 for hallo3)."),
    cfg: Optional[float] = typer.Option(None, "--cfg", callback=_number(*options.GUIDANCE), help="Classifier-free guidance scale, 0 to 100 (default 3.5)."),
    device: str = typer.Option("auto", "--device", callback=_device, help="torch device: auto, cpu, cuda, cuda:1, mps."),
    dtype: str = typer.Option("auto", "--dtype", callback=_one_of(*DTYPE_CHOICES), help="auto (bfloat16 on CUDA, else float32), float32, bfloat16, float16."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Where stage files and finished clips are kept (default: .hallo3-cache next to the output)."),
    separate_vocals: bool = typer.Option(False, "--separate-vocals", help="Isolate the voice with the release's MDX-Net model before embedding."),
    no_download: bool = typer.Option(False, "--no-download", help="Never fetch missing weights; fail with the download command instead."),
    offload: str = typer.Option("auto", "--offload", callback=_one_of(*OFFLOAD_CHOICES), help=OFFLOAD_HELP),
    weights_dtype: str = typer.Option("auto", "--weights-dtype", callback=_one_of(*WEIGHTS_CHOICES), help=WEIGHTS_HELP),
    vae_tiling: bool = typer.Option(False, "--vae-tiling", help="Tiled VAE encode/decode (less memory; tile seams differ slightly)."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the repeated DiT block (slow first clip, faster after)."),
    cache: Optional[float] = typer.Option(None, "--cache", callback=_number(0, 1, low_open=True, high_open=True), help="First Block Cache threshold, e.g. 0.05: skip most blocks on steps whose first block barely changed (faster, approximate)."),
    lora: Optional[str] = typer.Option(None, "--lora", callback=_lora, help=LORA_HELP),
    eval_after: bool = typer.Option(False, "--eval", help="Then score the video (hallo3 eval) into OUT.eval.json next to it."),
    parallel: str = typer.Option("auto", "--parallel", callback=_one_of(*PARALLEL_MODES), help=PARALLEL_HELP),
    cfg_parallel: Optional[bool] = typer.Option(None, "--cfg-parallel/--no-cfg-parallel", help="--parallel video: the two CFG halves on different processes (default: when the process count is even)."),
    ulysses: Optional[int] = typer.Option(None, "--ulysses", callback=_number(1, 4096), help="--parallel video: processes that split the attention heads (must divide the head count; default: as many as possible)."),
    ring: Optional[int] = typer.Option(None, "--ring", callback=_number(1, 4096), help="--parallel video: processes that split the queries and gather all keys/values (default: the rest)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress or logs on stderr."),
) -> None:
    """Render the talking video clip by clip (resumable: rerun the same command after an interruption).

    \b
    Examples:
      hallo3 render face.png speech.wav -o out.mp4
      hallo3 render --audio speech.audio.safetensors --ref face.ref.safetensors -o clips.safetensors
      hallo3 render --batch jobs.txt --out-dir videos/
      torchrun --nproc-per-node 4 --no-python hallo3 render face.png speech.wav -o out.mp4 --parallel video
    """
    if eval_after and (batch is not None or audio is not None or ref is not None):
        raise typer.BadParameter("--eval scores an mp4: use it with FACE SPEECH -o OUT.mp4", param_hint="--eval")
    runtime = _runtime(device, dtype, offload, weights_dtype, vae_tiling, compile, cache)
    from hallo3_cli.runtime import parallel_mode

    try:
        mode = parallel_mode(parallel, batch=batch is not None)
    except Hallo3Error as err:
        raise typer.BadParameter(str(err), param_hint="--parallel") from None
    if mode != "video" and (cfg_parallel is not None or ulysses is not None or ring is not None):
        raise typer.BadParameter("--cfg-parallel/--no-cfg-parallel, --ulysses and --ring need --parallel video",
                                 param_hint="--parallel")
    _setup(quiet)
    from hallo3_cli import jobs

    common = dict(seed=seed, steps=steps, cfg=cfg, allow_download=not no_download, runtime=runtime, lora=lora)
    if mode == "video":
        from hallo3_cli.jobs.parallel_session import VideoParallel

        common["parallel"] = VideoParallel(cfg_parallel=cfg_parallel, ulysses=ulysses, ring=ring)
    if batch is not None:
        if face or speech or audio or ref or output:
            raise typer.BadParameter("--batch takes no FACE/SPEECH/--audio/--ref/-o; use --out-dir", param_hint="--batch")
        if out_dir is None:
            raise typer.BadParameter("--batch needs --out-dir", param_hint="--out-dir")
        written, errors = jobs.render_batch(
            batch, out_dir, model=model or "hallo3", cache_dir=cache_dir, separate_vocals=separate_vocals, progress=not quiet,
            shard_jobs=mode != "none", **common
        )
        for path in written:
            emit(path)
        for message in errors:
            print(f"hallo3: error: {message}", file=sys.stderr)
        if errors:
            raise typer.Exit(1)
        return
    if output is None:
        raise typer.BadParameter("missing -o/--output", param_hint="-o")
    if audio is not None or ref is not None:
        if face or speech or audio is None or ref is None:
            raise typer.BadParameter("use either FACE SPEECH, or --audio and --ref together", param_hint="--audio/--ref")
        emit(jobs.render_clips(audio, ref, output, model=model, progress=not quiet, **common))
        return
    if face is None or speech is None:
        raise typer.BadParameter("give FACE and SPEECH (or --audio and --ref, or --batch)", param_hint="FACE SPEECH")
    if eval_after:  # what --eval writes and needs, checked before the render rather than after it
        from hallo3_cli import fsutil
        from hallo3_cli.evaluate import eval_path, require_eval_weights

        fsutil.check_outputs([(output, fsutil.VIDEO_SUFFIXES), (eval_path(output), (".json",))], inputs=[face, speech])
        require_eval_weights(model or "hallo3", allow_download=not no_download)
    emit(
        video := jobs.render_video(
            face, speech, output, model=model or "hallo3", prompt=prompt, cache_dir=cache_dir,
            separate_vocals=separate_vocals, progress=not quiet, **common,
        )
    )
    if eval_after:  # hallo3 eval of the finished video: OUT.eval.json next to it
        from hallo3_cli.evaluate import evaluate_render

        emit(evaluate_render(video, speech, face, model=model or "hallo3", device=device, allow_download=not no_download))


@app.command("prepare")
def prepare_cmd(
    sources: List[Path] = typer.Argument(..., metavar="SOURCE", help="Videos (mp4, mov, mkv, webm): folders (the release's videos/ + caption/<stem>.txt, or videos with same-stem .txt captions), list files (one video path per line) or video files. With --check: the dataset folder."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Dataset folder to write (created if missing; rerun the same command to resume)."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="Caption for the videos that have no caption file (without it they are skipped)."),
    allow_missing_faces: bool = typer.Option(False, "--allow-missing-faces", help="Keep videos with frames where no face is found (the release drops them); the face mask is the union over the frames with one."),
    separate_vocals: Optional[bool] = typer.Option(None, "--separate-vocals/--no-separate-vocals", help="Isolate the voice before wav2vec, as the release always does (default: on with the release's weights; random presets have no separator)."),
    frame_format: str = typer.Option("jpeg", "--frame-format", callback=_one_of("jpeg", "png"), help="How frames are stored: jpeg (quality --jpeg-quality) or png (lossless, ~4x larger)."),
    jpeg_quality: int = typer.Option(95, "--jpeg-quality", callback=_number(1, 100), help="JPEG quality of the stored frames, 1 to 100."),
    check: bool = typer.Option(False, "--check", help="Re-verify every file of the dataset folder given as SOURCE instead of preparing (exit 3 if anything is wrong)."),
    model: str = typer.Option("hallo3", "--model", "-m", help=MODEL_HELP, callback=_model),
    device: str = typer.Option("auto", "--device", callback=_device, help="torch device: auto (under torchrun: this process's GPU), cpu, cuda, cuda:1, mps."),
    dtype: str = typer.Option("auto", "--dtype", callback=_one_of(*DTYPE_CHOICES), help="T5's dtype: auto (bfloat16 on CUDA, else float32), float32, bfloat16, float16."),
    no_download: bool = typer.Option(False, "--no-download", help="Never fetch missing weights; fail with the download command instead."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress on stderr (skipped videos are still reported)."),
) -> None:
    """Talking-head videos -> a training dataset of stage files (resumable; several processes may share it).

    \b
    Examples:
      hallo3 prepare raw/ -o data/ --prompt "A person talking to the camera."
      hallo3 prepare --check data/
      torchrun --nproc-per-node 8 --no-python hallo3 prepare raw/ -o data/
      ls raw/*.mp4 | xargs -P 4 -n 16 hallo3 prepare -o data/ -q
    """
    _setup(quiet)
    from hallo3_cli.errors import InputError

    if check:
        if len(sources) != 1 or output is not None:
            raise typer.BadParameter("--check takes the dataset folder alone (no -o)", param_hint="--check")
        from hallo3_cli.training import check_dataset

        result = check_dataset(sources[0], progress=not quiet)
        for where, what in result.problems:
            print(f"hallo3: error: {where}: {what}", file=sys.stderr)
        if result.problems:
            raise InputError(f"{len(result.problems)} problem(s) in {result.videos} videos; rerun hallo3 prepare to "
                             "redo what is damaged", sources[0])
        print(f"hallo3: {sources[0]}: {result.videos} videos, {result.files} stage files verified", file=sys.stderr)
        emit(sources[0])
        return
    if output is None:
        raise typer.BadParameter("missing -o/--output (the dataset folder)", param_hint="-o")
    from hallo3_cli.training import format_summary, prepare_dataset

    result = prepare_dataset(sources, output, model=model, prompt=prompt, allow_missing_faces=allow_missing_faces,
                             separate_vocals=separate_vocals, codec=frame_format, quality=jpeg_quality, device=device,
                             dtype=dtype, progress=not quiet, allow_download=not no_download)
    if os.environ.get("RANK", "0") == "0" and (result.skipped or not quiet):
        print(format_summary(result), file=sys.stderr)
    if not result.kept:
        raise InputError(f"no video was kept (reasons above and in {result.report})", output)
    emit(result.manifest)


def _targets(value):
    """Callback: a comma-separated list of module-name suffixes ('' = none)."""
    if value is None:
        return value
    return tuple(t.strip() for t in value.split(",") if t.strip())


def _motion_noise(value):
    """Callback: ``MEAN,STD`` (two finite numbers, STD >= 0) or ``off`` (returned as ``()``)."""
    if value is None:
        return value
    if value.strip().lower() == "off":
        return ()
    try:
        mean, std = (float(v) for v in value.split(","))
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not 'MEAN,STD' or 'off'") from None
    if not (math.isfinite(mean) and math.isfinite(std) and std >= 0):
        raise typer.BadParameter(f"{value!r}: MEAN and STD must be finite and STD >= 0")
    return (mean, std)


@app.command("train")
def train_cmd(
    dataset: Path = typer.Argument(..., help="Dataset folder written by 'hallo3 prepare'."),
    output: Path = typer.Option(..., "--output", "-o", help="Run folder: checkpoints/, logs/ (TensorBoard), model/ and model-ema/ (or lora/ and lora-ema/), train.json."),
    stage: int = typer.Option(..., "--stage", callback=_number(1, 2), help="1: the identity path (both DiTs' attention + face modules); 2: the audio path (docs/training.md)."),
    model: str = typer.Option("hallo3", "--model", "-m", help=MODEL_HELP + " Stage 2 may start from a stage-1 run's RUN/model.", callback=_model),
    steps: int = typer.Option(30000, "--steps", callback=_number(1, 10**9), help="Updates to run (the release: 30,000 per stage)."),
    lr_steps: Optional[int] = typer.Option(None, "--lr-steps", callback=_number(1, 10**9), help="Length the LR warm-up (1 %) and linear decay are laid over (default: --steps)."),
    micro_batch: int = typer.Option(1, "--micro-batch", callback=_number(1, 4096), help="Samples per micro-batch and process (the release: 1)."),
    grad_accum: int = typer.Option(1, "--grad-accum", callback=_number(1, 4096), help="Micro-batches accumulated per update and process; one process accumulating N stands for N ranks (timestep bands included)."),
    seed: int = typer.Option(0, "--seed", callback=_number(0, 2**63 - 1), help="Seed of every draw (samples, dropout, noise, timesteps)."),
    learning_rate: Optional[float] = typer.Option(None, "--learning-rate", "--lr", callback=_number(0, 1, low_open=True), help="AdamW peak learning rate (the release: 1e-5)."),
    beta1: Optional[float] = typer.Option(None, "--beta1", callback=_number(0, 1, high_open=True), help="AdamW beta1 (the release: 0.9)."),
    beta2: Optional[float] = typer.Option(None, "--beta2", callback=_number(0, 1, high_open=True), help="AdamW beta2 (the release: 0.95)."),
    adam_eps: Optional[float] = typer.Option(None, "--adam-eps", callback=_number(0, 1, low_open=True), help="AdamW epsilon (the release: 1e-8)."),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay", callback=_number(0, 1), help="Decoupled weight decay, none on norms and biases (the release: 1e-4)."),
    grad_clip: Optional[float] = typer.Option(None, "--grad-clip", callback=_number(0, 1e6, low_open=True), help="Global gradient-norm clip (the release: 0.1)."),
    warmup: Optional[float] = typer.Option(None, "--warmup", callback=_number(0, 1), help="Warm-up, a fraction of --lr-steps (the release: 0.01)."),
    auto_warmup_steps: Optional[int] = typer.Option(None, "--auto-warmup-steps", callback=_number(0, 10**9), help="The release's fine-tuning warm-up: the first N updates capped at --auto-warmup-rate x lr (the release: 100; 0: off)."),
    auto_warmup_rate: Optional[float] = typer.Option(None, "--auto-warmup-rate", callback=_number(0, 1), help="The cap of those updates, a fraction of --lr (the release: 0.05)."),
    ema_max_decay: Optional[float] = typer.Option(None, "--ema-max-decay", callback=_number(0, 1, high_open=True), help="EMA decay min(this, (1+n)/(10+n)) (the release: 0.9999)."),
    drop_text: Optional[float] = typer.Option(None, "--drop-text", callback=_number(0, 1), help="Caption dropout rate (the release: 0.1)."),
    drop_image: Optional[float] = typer.Option(None, "--drop-image", callback=_number(0, 1), help="Image-condition dropout rate (the release: 0.05)."),
    drop_reference: Optional[float] = typer.Option(None, "--drop-reference", callback=_number(0, 1), help="Reference-latent dropout rate (the release: 0.05)."),
    drop_audio: Optional[float] = typer.Option(None, "--drop-audio", callback=_number(0, 1), help="Audio dropout rate, stage 2 (the release: 0.05)."),
    motion_noise: Optional[str] = typer.Option(None, "--motion-noise", callback=_motion_noise, help="Noise on the image condition's motion frames: 'MEAN,STD' of log sigma (the release: -3,0.5) or 'off'."),
    motion_mask_rate: Optional[float] = typer.Option(None, "--motion-mask-rate", callback=_number(0, 1), help="Pixel-mask rate of the motion frames (the release: 0.1; 0: no mask)."),
    mixed_precision: str = typer.Option("no", "--mixed-precision", callback=_one_of("no", "bf16"), help="bf16: frozen weights in bf16, trained ones float32 masters, computed under autocast; no: float32."),
    gradient_checkpointing: bool = typer.Option(True, "--gradient-checkpointing/--no-gradient-checkpointing", help="Recompute the main DiT's blocks in the backward pass (the release's choice; less memory)."),
    lora: Optional[int] = typer.Option(None, "--lora", callback=_number(1, 4096), help="Train LoRA adapters of this rank instead of the release's parameters (a deviation; one GPU)."),
    lora_alpha: Optional[float] = typer.Option(None, "--lora-alpha", callback=_number(0, 1e6, low_open=True), help="LoRA alpha (default: the rank)."),
    lora_targets: Optional[str] = typer.Option(None, "--lora-targets", callback=_targets, help="Comma-separated module names of the main DiT to adapt (default: the stage's attention, docs/training.md)."),
    lora_reference_targets: Optional[str] = typer.Option(None, "--lora-reference-targets", callback=_targets, help="The same for the reference network ('' = leave it alone; default: its attention in stage 1)."),
    save_every: int = typer.Option(500, "--save-every", callback=_number(1, 10**9), help="A checkpoint every N updates (and at the end)."),
    keep: Optional[int] = typer.Option(None, "--keep", callback=_number(1, 10**6), help="Keep only the newest N checkpoints."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in -o from its newest checkpoint (the same data, seed and recipe)."),
    stop_at: Optional[int] = typer.Option(None, "--stop-at", callback=_number(1, 10**9), help="Save and stop after this update (a time-boxed job; --resume continues)."),
    validate_every: Optional[int] = typer.Option(None, "--validate-every", callback=_number(1, 10**9), help="Render and score (hallo3 eval) the validation pair every N updates."),
    validation_portrait: Optional[Path] = typer.Option(None, "--validation-portrait", help="Held-out portrait for --validate-every."),
    validation_speech: Optional[Path] = typer.Option(None, "--validation-speech", help="Held-out speech for --validate-every."),
    device: str = typer.Option("auto", "--device", callback=_one_of("auto", "cpu"), help="auto: this process's GPU (accelerate's choice), else the CPU; cpu."),
    engine: str = typer.Option("ddp", "--engine", callback=_one_of("ddp", "fsdp2"), help="ddp: every process holds the networks and optimizer; fsdp2: torch FSDP2 shards them per transformer block (full fine-tuning on several GPUs)."),
    tensorboard: bool = typer.Option(True, "--tensorboard/--no-tensorboard", help="TensorBoard event files in RUN/logs."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress on stderr."),
) -> None:
    """Fine-tune Hallo3 on a prepared dataset, as the release trains it (or LoRA adapters). Prints a JSON summary.

    \b
    Examples:
      hallo3 train data/ -o runs/s1 --stage 1
      hallo3 train data/ -o runs/s2 --stage 2 --model runs/s1/model
      hallo3 train data/ -o runs/lora --stage 2 --lora 64
      torchrun --nproc-per-node 8 -m hallo3_cli train data/ -o runs/s1 --stage 1 --engine fsdp2
      hallo3 train data/ -o runs/s1 --stage 1 --resume
    """
    _setup(quiet)
    if lora is None and (lora_alpha is not None or lora_targets is not None or lora_reference_targets is not None):
        raise typer.BadParameter("--lora-alpha and --lora-targets need --lora RANK", param_hint="--lora")
    if validate_every is not None and (validation_portrait is None or validation_speech is None):
        raise typer.BadParameter("--validate-every needs --validation-portrait and --validation-speech",
                                 param_hint="--validate-every")
    _loading_torch()
    import dataclasses

    from hallo3_cli.training import RELEASE
    from hallo3_cli.training.trainer import LoraSpec, TrainConfig, train

    chosen = {"learning_rate": learning_rate, "eps": adam_eps, "weight_decay": weight_decay, "grad_clip": grad_clip,
              "warmup": warmup, "auto_warmup_steps": auto_warmup_steps, "auto_warmup_rate": auto_warmup_rate,
              "ema_max_decay": ema_max_decay, "drop_text": drop_text, "drop_image": drop_image,
              "drop_reference": drop_reference, "drop_audio": drop_audio, "motion_mask_rate": motion_mask_rate}
    if beta1 is not None or beta2 is not None:
        chosen["betas"] = (RELEASE.betas[0] if beta1 is None else beta1, RELEASE.betas[1] if beta2 is None else beta2)
    recipe = dataclasses.replace(RELEASE, micro_batch=micro_batch, save_every=save_every,
                                 **{k: v for k, v in chosen.items() if v is not None})
    if motion_noise is not None:
        recipe = dataclasses.replace(recipe, motion_noise=motion_noise or None)  # 'off': None
    spec = None if lora is None else LoraSpec(lora, lora_alpha, lora_targets, lora_reference_targets)
    config = TrainConfig(dataset, output, stage, model=model, steps=steps, lr_steps=lr_steps, micro_batch=micro_batch,
                         grad_accum=grad_accum, seed=seed, recipe=recipe, mixed_precision=mixed_precision,
                         gradient_checkpointing=gradient_checkpointing, lora=spec, save_every=save_every, keep=keep,
                         resume=resume, stop_at=stop_at, validate_every=validate_every,
                         validation_portrait=validation_portrait, validation_speech=validation_speech, device=device,
                         engine=engine, tensorboard=tensorboard, progress=not quiet)
    result = train(config)
    if os.environ.get("RANK", "0") == "0":
        print(result.to_json(), flush=True)


@app.command("stitch")
def stitch_cmd(
    clips: Path = typer.Argument(..., help="Clips file written by 'hallo3 render -o CLIPS.safetensors'."),
    output: Path = typer.Option(..., "--output", "-o", help="Video to write (.mp4)."),
    audio: Path = typer.Option(..., "--audio", help="The original speech recording to mux."),
    device: str = typer.Option("auto", "--device", callback=_device, help="torch device for the VAE decoder."),
    offload: str = typer.Option("auto", "--offload", callback=_one_of(*OFFLOAD_CHOICES), help=OFFLOAD_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress or logs on stderr."),
) -> None:
    """Clips + speech -> mp4 (H.264 + AAC, 25 fps).

    Example: hallo3 stitch clips.safetensors --audio speech.wav -o out.mp4
    """
    _setup(quiet)
    from hallo3_cli.jobs import stitch

    emit(stitch(clips, output, audio=audio, progress=not quiet, runtime=_runtime(device, offload=offload)))


@app.command("eval")
def eval_cmd(
    video: Path = typer.Argument(..., help="Talking video to score (mp4, mov, webm, mkv, ...)."),
    audio: Optional[Path] = typer.Option(None, "--audio", help="Speech to check the lips against (default: the video's own track)."),
    ref: Optional[Path] = typer.Option(None, "--ref", help="Portrait for identity similarity (default: the video's first face)."),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON object instead of the table."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write a PNG of lip-sync confidence and identity similarity per second."),
    model: str = typer.Option("hallo3", "--model", "-m", callback=_model, help=MODEL_HELP),
    device: str = typer.Option("auto", "--device", callback=_device, help="torch device: auto, cpu, cuda, cuda:1, mps."),
    identity_stride: int = typer.Option(5, "--identity-stride", min=1, help="Embed the face of every N-th frame for identity."),
    no_download: bool = typer.Option(False, "--no-download", help="Never fetch missing weights; fail with the download command instead."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress or logs on stderr."),
) -> None:
    """Lip-sync (SyncNet Sync-C, Sync-D, AV offset) and identity (ArcFace) scores of any talking video.

    Example: hallo3 eval out.mp4 --ref face.png --plot scores.png
    """
    _setup(quiet)
    from hallo3_cli.evaluate import evaluate_video, format_table

    report = evaluate_video(video, audio=audio, ref=ref, model=model, device=device, plot=plot,
                            identity_stride=identity_stride, allow_download=not no_download)
    print(report.to_json() if json_output else format_table(report))

@app.command("serve")
def serve_cmd(
    model: str = typer.Option("hallo3", "--model", "-m", callback=_model, help=MODEL_HELP),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on; any other than 127.0.0.1/localhost/::1 needs --auth-file."),
    port: int = typer.Option(7860, "--port", callback=_number(1, 65535), help="TCP port."),
    auth_file: Optional[Path] = typer.Option(None, "--auth-file", help="Logins, one 'user:password' per line; must not be readable by others."),
    max_upload_mb: float = typer.Option(50.0, "--max-upload-mb", callback=_number(0, 1e6, low_open=True), help="Largest accepted upload in MB (2^20 bytes)."),
    max_speech_seconds: float = typer.Option(600.0, "--max-speech-seconds", callback=_number(0, 86400, low_open=True), help="Longest accepted speech recording in seconds."),
    cache_dir: Path = typer.Option(Path(".hallo3-cache"), "--cache-dir", help="Stage files and finished clips (shared by all sessions, as 'render' uses it)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No logs on stderr."),
) -> None:
    """The whole render as a web page (Gradio; pip install "hallo3-cli[web]"). Prints its URL; Ctrl-C stops it.

    Example: hallo3 serve --model tiny-random --port 7860
    """
    _setup(quiet)
    from hallo3_cli.web import serve

    serve(model, host=host, port=port, auth_file=auth_file, max_upload_mb=max_upload_mb,
          max_speech_seconds=max_speech_seconds, cache_dir=cache_dir)


# --------------------------------------------------------------------------------------------
# entry point


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the Typer app and turn errors into one-line messages.

    With ``--debug`` the traceback is printed too, and the exit code stays the documented one.
    """
    debug = "--debug" in (argv if argv is not None else sys.argv[1:]) or os.environ.get("HALLO3_DEBUG") == "1"
    signal.signal(signal.SIGTERM, _terminated)  # run cleanups (no partial outputs) when killed politely
    try:
        code = app(args=argv, prog_name="hallo3", standalone_mode=False)
        if code == 130:  # Typer turns KeyboardInterrupt (Ctrl-C) into a silent exit 130
            _interrupted(False)
        if isinstance(code, int) and code != 0:
            sys.exit(code)
    except Hallo3Error as err:
        if _reports(err):
            _traceback(debug)
            print(f"hallo3: error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        _interrupted(debug)
    except SystemExit:
        raise
    except Exception as err:
        # Typer vendors click: recognise its usage errors by shape rather than by class.
        if type(err).__name__ == "NoArgsIsHelpError":  # `hallo3` alone: the help as --help prints it, exit 2
            print(err.format_message().rstrip(), file=sys.stderr)
            sys.exit(err.exit_code)
        if hasattr(err, "format_message") and isinstance(getattr(err, "exit_code", None), int):
            if _first_of_many():
                ctx = getattr(err, "ctx", None)
                where = ctx.command_path if ctx is not None else "hallo3"
                message = " ".join(err.format_message().split())  # one line, whatever click wrapped
                kind = "usage error" if err.exit_code == 2 else "error"
                print(f"hallo3: {kind}: {message} (see '{where} --help')", file=sys.stderr)
            sys.exit(err.exit_code)
        if type(err).__name__ == "Abort":  # click turns Ctrl-C into Abort
            _interrupted(debug)
        if not _reports(err):
            sys.exit(1)
        _traceback(debug)
        message = reason(err) if str(err).strip() else ""
        hint = "" if debug else " (rerun with --debug for the traceback)"
        print(f"hallo3: error: {type(err).__name__}: {message[:300]}{hint}", file=sys.stderr)
        sys.exit(1)


def _traceback(debug: bool) -> None:
    if debug:
        import traceback

        traceback.print_exc()


def _reports(err: BaseException) -> bool:
    """Whether this process prints ``err``: always, except in a ``--parallel video`` render under
    torchrun, where one rank speaks for all (see ``jobs.parallel_session.reports_failure``)."""
    session = sys.modules.get("hallo3_cli.jobs.parallel_session")  # imported only by such a render
    return session is None or session.reports_failure(err)


def _first_of_many() -> bool:
    """Not a rank > 0 under torchrun: usage errors are the same on every rank (same argv), rank 0 says them."""
    return os.environ.get("RANK", "0") == "0" or os.environ.get("WORLD_SIZE", "1") == "1"


def _interrupted(debug: bool) -> None:
    if _reports(KeyboardInterrupt()):
        _traceback(debug)
        print("hallo3: interrupted", file=sys.stderr)
    sys.exit(130)


def _terminated(signum, frame):
    if _reports(SystemExit(128 + signum)):  # under torchrun: the agent stopping us after another rank failed
        print("hallo3: terminated", file=sys.stderr)
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    main()
