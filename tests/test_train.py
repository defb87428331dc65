"""``hallo3 train`` end to end on CPU (docs/training.md "The trainer"): one synthetic talking-head video prepared
as tests/test_prepare.py prepares them, stage 1, stage 2 and LoRA runs through the CLI, what overfitting that video
does to a held-out loss and to a render of it, the exported model folder and adapters through ``hallo3 render``,
Ctrl-C and a bit-identical resume, 2 processes against 1 accumulating 2 micro-batches, and bad arguments.

The model is the tiny-test network at 64×96 with 13-frame clips (4 latent frames). Its random VAE would make
the video unlearnable: its posterior std (≈ 1) is several times its mean (rms ≈ 0.16), so a posterior *sample*
of a clip is mostly noise and two samples of one clip have little in common. The base model of these tests
(``base_model``) is therefore that random model saved as a model folder with a VAE made deterministic (log-variance
−20), as a trained VAE nearly is; everything else is the random preset's.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import cut_wav  # noqa: E402
from synthetic_video import make_video  # noqa: E402

pytest.importorskip("peft")
pytest.importorskip("tensorboard")
pytestmark = pytest.mark.slow

PRESETS = Path(__file__).with_name("presets_test.toml")
MODEL = "tiny-train"
STEPS = 30  # the overfitting run (~0.3 s an update here)
HELD_OUT_T = 950  # a high-noise timestep: see test_overfitting_one_video


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """tiny-test with 13-frame clips and the fake face models of tests/test_face.py (for hallo3 prepare); one
    thread per process (two cores shared by several processes run far slower with more)."""
    pytest.importorskip("onnx")
    from test_face import make_matmul_recognizer, make_scrfd

    from hallo3_cli import face

    root = tmp_path_factory.mktemp("train_preset")
    models = root / "face_models"
    models.mkdir()
    kps = (face.CANONICAL_KEYPOINTS[:, :2] / 8 + 0.5).ravel()
    make_scrfd(models / face.DETECTOR_FILE, static=(160, 160), kps_offsets=kps)
    make_matmul_recognizer(models / face.RECOGNIZER_FILE, np.random.default_rng(0).normal(size=(588, 512)))
    table = PRESETS.read_text().replace("[tiny-test", f"[{MODEL}").replace("clip_length = 49", "clip_length = 13")
    table = table.replace('description = "tiny-random at 64x96', f'face_models = "{models}"\ndescription = "tiny-random at 64x96', 1)
    (root / "presets.toml").write_text(table)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HALLO3_PRESETS", f"{PRESETS}{os.pathsep}{root / 'presets.toml'}")
        patch.setenv("OMP_NUM_THREADS", "1")
        yield root
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def speech(env, media_dir) -> Path:
    return cut_wav(media_dir / "speech_0001.wav", env / "speech.wav", 3.0)


@pytest.fixture(scope="module")
def dataset(env, media_dir, speech) -> Path:
    """One 2.4 s talking head (60 frames at 25 fps), prepared."""
    from hallo3_cli.training import prepare_dataset

    raw = env / "raw"
    raw.mkdir()
    make_video(raw / "talk.mp4", media_dir / "face_0001.jpg", speech, seconds=2.4)
    (raw / "talk.txt").write_text("A person talking to the camera.\n")
    result = prepare_dataset([raw], env / "dataset", model=MODEL, progress=False)
    assert [o.id for o in result.kept] == ["talk"]
    return env / "dataset"


@pytest.fixture(scope="module")
def base_model(env) -> Path:
    """The random preset saved as a model folder, its VAE's posterior made deterministic (see the docstring)."""
    from hallo3_cli import load_pipeline

    pipe = load_pipeline(MODEL, device="cpu", torch_dtype=torch.float32)
    conv = pipe.vae.encoder.conv_out.conv  # (mean, log-variance) channels
    with torch.no_grad():
        half = conv.out_channels // 2
        conv.weight[half:] = 0
        conv.bias[half:] = -20.0
    pipe.save_pretrained(env / "base")
    return env / "base"


def hallo3(*args, check=True, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "hallo3_cli", *map(str, args)], capture_output=True, text=True,
                            timeout=600, **kwargs)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


FAST = ("--lr", "1e-2", "--warmup", "0", "--auto-warmup-steps", "0", "--device", "cpu")
NO_DROPS = ("--drop-text", "0", "--drop-image", "0", "--drop-reference", "0")


@pytest.fixture(scope="module")
def stage1_run(dataset, base_model, env) -> tuple[Path, dict]:
    """Overfit the video: stage 1, lr 1e-2 without warm-up and without condition dropout, 30 updates."""
    run = env / "s1"
    result = hallo3("train", dataset, "-o", run, "--stage", 1, "--model", base_model, "--steps", STEPS,
                    "--save-every", 10, "--keep", 2, *FAST, *NO_DROPS)
    return run, json.loads(result.stdout)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "diffusion_pytorch_model.safetensors"))


# ---------------------------------------------------------------------------------------------
# a full run: what it writes


def test_stage1_run_writes_checkpoints_logs_and_model_folders(stage1_run, base_model):
    from safetensors.torch import load_file

    run, summary = stage1_run
    assert summary["steps"] == summary["updates"] == STEPS and summary["skipped"] == 0 and not summary["stopped"]
    assert set(summary["exported"]) == {"model", "model-ema"}
    assert [p.name for p in sorted((run / "checkpoints").iterdir())] == ["step-20", "step-30"]  # --keep 2
    assert list((run / "logs").glob("events.out.tfevents.*"))
    assert json.loads((run / "train.json").read_text())["updates"] == STEPS
    trained = load_file(str(run / "checkpoints" / "step-30" / "trainable.safetensors"))
    ema = load_file(str(run / "checkpoints" / "step-30" / "ema.safetensors"))
    for folder, expected in (("model", trained), ("model-ema", ema)):
        for network in ("transformer", "reference_net"):
            base, exported = weights(base_model / network), weights(run / folder / network)
            assert exported.keys() == base.keys()
            for name, tensor in exported.items():
                key = f"{network}.{name}"
                if key in expected:  # a trained parameter: the run's (raw or EMA) value
                    assert torch.equal(tensor, expected[key]), key
                else:  # frozen: the base model's, untouched
                    assert torch.equal(tensor, base[name]), key
    assert any(not torch.equal(trained[k], ema[k]) for k in trained)
    # the frozen components are the base folder's files (hard links where the file system allows)
    vae = next((run / "model" / "vae").glob("*.safetensors"))
    assert vae.read_bytes() == next((base_model / "vae").glob("*.safetensors")).read_bytes()


def held_out_sample(dataset: Path) -> dict:
    """A sample of the video drawn with another seed than the run's."""
    from torch.utils.data import default_collate

    from hallo3_cli.training import Hallo3Dataset

    return default_collate([Hallo3Dataset(dataset, 1, seed=12345, length=8)[3]])


def held_out_loss(pipe, batch) -> float:
    from hallo3_cli.training import training_loss
    from hallo3_cli.training.conditions import step_inputs

    inputs = step_inputs(batch, pipe.vae, stage=1, generator=torch.Generator().manual_seed(5), drops=False)
    inputs["timestep"] = torch.tensor([HELD_OUT_T])
    with torch.no_grad():
        return float(training_loss(pipe.transformer, pipe.reference_net, stage=1, **inputs))


def first_clip_distance(pipe, batch, dataset: Path) -> float:
    """Latent MSE between the video's clip and a render of it from its own reference frame, caption and speech,
    one sampling step (see test_overfitting_one_video)."""
    from safetensors.torch import load_file

    from hallo3_cli.pipeline_hallo3 import Hallo3Audio, Hallo3Reference, vae_latents
    from hallo3_cli.training.dataset import item_file

    sample = {key: value[0] if torch.is_tensor(value) or isinstance(value, list) else value for key, value in batch.items()}
    ref_latent = pipe.encode_reference_latent(sample["masked_ref"])
    reference = Hallo3Reference(
        image=sample["ref_image"], ref_latent=ref_latent[0, 0], face_embedding=sample["face_embedding"],
        face_box=torch.tensor([16, 0, 80, 64], dtype=torch.int32), prompt_embeds=sample["prompt_embeds"],
        ref_bank=pipe.reference_features(ref_latent, sample["prompt_embeds"]), framing="pad", source_width=160,
        source_height=160, face_found=True, prompt=sample["caption"])
    start = int(sample["start"])
    features = load_file(str(item_file(dataset, "talk", "audio")))["features"][start:start + pipe.clip_length]
    audio = Hallo3Audio(features=features.float(), num_frames=pipe.clip_length)
    clip = next(pipe.generate_clips(audio, reference, seed=3, num_inference_steps=1, decode_last=False,
                                    progress=False))
    with torch.no_grad():
        target = vae_latents(pipe.vae, sample["frames"][None], torch.Generator().manual_seed(0), pipe.vae_scale)
    return float((clip.latents.float() - target.float()).square().mean())


def test_overfitting_one_video(stage1_run, base_model, dataset):
    """On a held-out sample of the video (fixed noise, fixed timestep) the loss falls by at least 30 %, and a
    render of its clip is at least 2× closer to it than before.

    Both at high noise: there the v-target is mostly the clip itself (x0), which a few seconds of overfitting teach
    the tiny DiT. At low noise it must also pass the noise ε through its random, frozen input and output layers
    (std 0.02, untrained in stage 1), which takes far longer than a test; so the render is one sampling step, whose
    only step is at t = 999, where the zero-SNR sampler's result is the network's own x0 prediction."""
    from hallo3_cli import Hallo3Pipeline

    run, _ = stage1_run
    batch = held_out_sample(dataset)
    scores = {}
    for name, folder in (("before", base_model), ("after", run / "model")):
        pipe = Hallo3Pipeline.from_pretrained(folder)
        pipe.set_progress_bar_config(disable=True)
        scores[name] = held_out_loss(pipe, batch), first_clip_distance(pipe, batch, dataset)
    (loss_before, mse_before), (loss_after, mse_after) = scores["before"], scores["after"]
    assert loss_after <= 0.7 * loss_before, scores
    assert mse_after <= 0.5 * mse_before, scores


def test_render_loads_the_exported_model(stage1_run, media_dir, speech, tmp_path):
    run, _ = stage1_run
    one = cut_wav(speech, tmp_path / "one.wav", 0.6)
    out = tmp_path / "out.mp4"
    result = hallo3("render", media_dir / "face_0001.jpg", one, "-o", out, "--model", run / "model", "--device", "cpu",
                    "-q")
    assert out.is_file() and out.stat().st_size > 0, result.stderr


# ---------------------------------------------------------------------------------------------
# stage 2 and LoRA


def test_stage2_from_the_stage1_model_trains_the_audio_path_only(stage1_run, dataset, env):
    run1, _ = stage1_run
    run = env / "s2"
    summary = json.loads(hallo3("train", dataset, "-o", run, "--stage", 2, "--model", run1 / "model", "--steps", 2,
                                "--no-tensorboard", *FAST).stdout)
    assert summary["updates"] == 2
    for network in ("transformer", "reference_net"):
        before, after = weights(run1 / "model" / network), weights(run / "model" / network)
        changed = {name for name in before if not torch.equal(before[name], after[name])}
        if network == "reference_net":
            assert not changed
        else:
            assert changed and all("audio" in name for name in changed), sorted(changed)[:5]


def test_lora_run_exports_adapters_that_render_applies(dataset, base_model, env, media_dir, speech, tmp_path):
    from hallo3_cli import Hallo3Pipeline
    from hallo3_cli.loading import LoraWeights

    run = env / "lora"
    summary = json.loads(hallo3("train", dataset, "-o", run, "--stage", 1, "--model", base_model, "--steps", 2,
                                "--lora", 4, "--no-tensorboard", *FAST, *NO_DROPS).stdout)
    assert set(summary["exported"]) == {"lora", "lora-ema"} and not (run / "model").exists()
    lora = LoraWeights.parse(run / "lora")
    assert lora.reference_path is not None  # stage 1 adapts the reference network too
    pipe = Hallo3Pipeline.from_pretrained(base_model)
    pipe.load_lora_weights(run / "lora")  # diffusers' own loader reads the main DiT's file
    assert any("lora_B" in name and p.abs().sum() > 0 for name, p in pipe.transformer.named_parameters())
    one = cut_wav(speech, tmp_path / "one.wav", 0.6)
    out = tmp_path / "lora.mp4"
    hallo3("render", media_dir / "face_0001.jpg", one, "-o", out, "--model", base_model, "--lora", f"{run / 'lora'}:0.5",
           "--device", "cpu", "-q")
    assert out.is_file()


# ---------------------------------------------------------------------------------------------
# resume and processes


def final_state(run: Path, step: int) -> dict:
    from hallo3_cli.training.checkpoint import checkpoint_dir, load_checkpoint

    return load_checkpoint(checkpoint_dir(run, step))


def assert_same_state(a: dict, b: dict, atol: float = 0.0) -> None:
    for key in ("trainable", "ema"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            if atol:
                assert torch.allclose(a[key][name], b[key][name], atol=atol, rtol=0), (key, name)
            else:
                assert torch.equal(a[key][name], b[key][name]), (key, name)


def test_ctrl_c_saves_and_resume_is_bit_identical(dataset, env):
    """An uninterrupted 5-update run (Python API) against one stopped by SIGINT after its first checkpoint and
    resumed (CLI): the same weights, EMA and optimizer state, bit for bit."""
    from hallo3_cli.training.trainer import TrainConfig, train

    whole = env / "whole"
    train(TrainConfig(dataset, whole, 1, model=MODEL, steps=5, save_every=5, device="cpu", tensorboard=False,
                      progress=False))
    run = env / "interrupted"
    args = ["train", dataset, "-o", run, "--stage", 1, "--model", MODEL, "--steps", 5, "--save-every", 1,
            "--device", "cpu", "--no-tensorboard"]
    process = subprocess.Popen([sys.executable, "-m", "hallo3_cli", *map(str, args)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (run / "checkpoints" / "step-1").is_dir() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 130, stderr[-2000:]
    assert "interrupted" in stderr and "Traceback" not in stderr
    saved = [int(p.name.split("-")[1]) for p in (run / "checkpoints").iterdir()]
    assert max(saved) < 5 and not (run / "model").exists()  # stopped early, its last update saved
    hallo3(*args, "--resume")
    assert_same_state(final_state(whole, 5), final_state(run, 5))
    assert final_state(whole, 5)["optimizer"]["state"].keys() == final_state(run, 5)["optimizer"]["state"].keys()
    for index, state in final_state(whole, 5)["optimizer"]["state"].items():
        other = final_state(run, 5)["optimizer"]["state"][index]
        assert all(torch.equal(state[k], other[k]) for k in state)


def test_a_non_finite_loss_skips_the_update_and_stop_at_stops(dataset, env, monkeypatch):
    """The first micro-batch's loss made NaN: that update is skipped (no optimizer, scheduler or EMA step; the
    weights stay finite) and the run goes on; --stop-at saves and stops without exporting. A checkpoint written
    before any update holds an empty optimizer state, and a resume from it continues the run bit for bit."""
    import shutil

    from hallo3_cli.training import trainer

    calls, original = [], trainer.training_loss

    def poisoned(*args, **kwargs):
        calls.append(1)
        loss = original(*args, **kwargs)
        return loss * float("nan") if len(calls) == 1 else loss

    monkeypatch.setattr(trainer, "training_loss", poisoned)
    run = env / "nan"
    config = trainer.TrainConfig(dataset, run, 1, model=MODEL, steps=4, stop_at=3, save_every=1, device="cpu",
                                 tensorboard=False, progress=False)
    result = trainer.train(config)
    assert (result.steps, result.updates, result.skipped, result.stopped) == (3, 2, 1, True)
    assert not result.exported and not (run / "model").exists()
    first = final_state(run, 1)
    assert first["state"]["updates"] == 0 and first["optimizer"]["state"] == {}
    state = final_state(run, 3)
    assert state["state"]["updates"] == 2 and state["state"]["scheduler"]["last_epoch"] == 2
    assert all(torch.isfinite(t).all() for t in [*state["trainable"].values(), *state["ema"].values()])
    assert all(int(s["step"]) == 2 for s in state["optimizer"]["state"].values())
    resumed = env / "nan-resumed"
    shutil.copytree(run, resumed)
    for step in (2, 3):
        shutil.rmtree(resumed / "checkpoints" / f"step-{step}")
    trainer.train(replace(config, output=resumed, resume=True))  # (no NaN now: calls is past the first)
    again = final_state(resumed, 3)
    assert_same_state(state, again)
    for name, moments in state["optimizer"]["state"].items():
        assert all(torch.equal(moments[k], again["optimizer"]["state"][name][k]) for k in moments), name


@pytest.fixture(scope="module")
def accumulating(dataset, env) -> Path:
    """1 process accumulating 2 micro-batches, 2 updates: what 2 processes × micro-batch 1 must equal."""
    from hallo3_cli.training.trainer import TrainConfig, train

    one = env / "accumulating"
    train(TrainConfig(dataset, one, 1, model=MODEL, steps=2, grad_accum=2, save_every=2, device="cpu",
                      tensorboard=False, progress=False))
    return one


def torchrun(dataset, run: Path, *extra, port: int) -> subprocess.CompletedProcess:
    """``hallo3 train`` stage 1, 2 updates, under torchrun with 2 CPU processes (gloo)."""
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port), "-m",
         "hallo3_cli", "train", str(dataset), "-o", str(run), "--stage", "1", "--model", MODEL, "--steps", "2",
         "--device", "cpu", "--no-tensorboard", "-q", *map(str, extra)],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_two_processes_equal_one_accumulating_two(dataset, env, accumulating):
    """torchrun (gloo) with 2 processes × micro-batch 1 against 1 process accumulating 2 micro-batches: the same
    samples, draws and timestep bands, so the same weights within 1e-5."""
    two = env / "ddp"
    result = torchrun(dataset, two, "--save-every", 2, port=29517)
    assert json.loads(result.stdout)["updates"] == 2  # one summary: rank 0's
    a, b = final_state(accumulating, 2), final_state(two, 2)
    assert a["trainable"] and a["state"]["updates"] == b["state"]["updates"] == 2
    assert_same_state(a, b, atol=1e-5)


def test_fsdp2_equals_one_process_and_resumes(dataset, env, accumulating):
    """--engine fsdp2 (torch FSDP2 over 2 gloo processes, a shard of every block on each): the checkpoint (full
    tensors gathered from the shards) equals 1 process accumulating 2 micro-batches within 1e-5, weights, EMA and
    Adam moments; the exported model holds the gathered weights; and resuming from its step-1 checkpoint under
    FSDP2 gives its step-2 checkpoint bit for bit."""
    import shutil

    run = env / "fsdp2"
    result = torchrun(dataset, run, "--engine", "fsdp2", "--save-every", 1, port=29518)
    assert json.loads(result.stdout)["updates"] == 2
    a, b = final_state(accumulating, 2), final_state(run, 2)
    assert_same_state(a, b, atol=1e-5)
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for name, state in a["optimizer"]["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.allclose(state[key], b["optimizer"]["state"][name][key], atol=1e-7, rtol=1e-3), (name, key)
    for network in ("transformer", "reference_net"):
        exported = weights(run / "model-ema" / network)
        for name, tensor in b["ema"].items():
            if name.startswith(network + "."):
                assert torch.equal(exported[name[len(network) + 1:]], tensor), name
    shutil.copytree(run, env / "fsdp2-resumed")
    shutil.rmtree(env / "fsdp2-resumed" / "checkpoints" / "step-2")
    torchrun(dataset, env / "fsdp2-resumed", "--engine", "fsdp2", "--save-every", 1, "--resume", port=29519)
    resumed = final_state(env / "fsdp2-resumed", 2)
    assert_same_state(b, resumed)
    assert b["optimizer"]["state"].keys() == resumed["optimizer"]["state"].keys()
    for name, state in b["optimizer"]["state"].items():
        assert all(torch.equal(state[k], resumed["optimizer"]["state"][name][k]) for k in state), name


# ---------------------------------------------------------------------------------------------
# bad arguments


def test_bad_arguments_are_one_line_errors(stage1_run, dataset, env, tmp_path):
    from hallo3_cli.errors import UsageError
    from hallo3_cli.training.trainer import TrainConfig, train

    run, _ = stage1_run
    cases = [
        (("--stage", 3), 2, "--stage"),
        (("--stage", 1, "--lora-alpha", 8), 2, "--lora"),
        (("--stage", 1, "--motion-noise", "x"), 2, "MEAN,STD"),
        (("--stage", 1, "--validate-every", 5), 2, "--validation-portrait"),
        (("--stage", 1, "--mixed-precision", "fp16"), 2, "--mixed-precision"),
    ]
    for extra, code, words in cases:
        result = hallo3("train", dataset, "-o", tmp_path / "new", *extra, check=False)
        assert result.returncode == code and words in result.stderr, (extra, result.stderr)
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    from hallo3_cli.errors import ArgumentError
    from hallo3_cli.training.trainer import LoraSpec

    with pytest.raises(ArgumentError, match="--lora trains on the ddp engine"):
        TrainConfig(dataset, tmp_path / "new", 1, engine="fsdp2", lora=LoraSpec(4))
    with pytest.raises(ArgumentError, match="validate_every runs on the ddp engine only"):
        TrainConfig(dataset, tmp_path / "new", 1, engine="fsdp2", validate_every=1, validation_portrait=tmp_path,
                    validation_speech=tmp_path)
    with pytest.raises(ArgumentError, match="engine must be one of ddp, fsdp2"):
        TrainConfig(dataset, tmp_path / "new", 1, engine="deepspeed")
    # a folder holding a run: not without --resume, and --resume only for the same run (checked before any work)
    with pytest.raises(UsageError, match="already holds a training run"):
        train(TrainConfig(dataset, run, 1, model=MODEL, device="cpu"))
    with pytest.raises(UsageError, match="holds a different run"):
        train(TrainConfig(dataset, run, 1, model=MODEL, device="cpu", resume=True))
    assert not list(run.glob(".*tmp*"))
    result = hallo3("train", tmp_path / "nothing", "-o", tmp_path / "r", "--stage", 1, "--model", MODEL,
                    "--device", "cpu", check=False)
    assert result.returncode == 3 and "manifest.json" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and result.stderr.strip().splitlines()[-1].startswith("hallo3: error: ")
    assert not (tmp_path / "r").exists()  # nothing written
