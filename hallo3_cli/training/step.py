"""The release's training step (docs/model.md §10.3–10.5): what is trained, and the loss of one batch.

    named = trainable_parameters(transformer, reference_net, stage=1)   # [(name, parameter)]; sets requires_grad
    loss = training_loss(transformer, reference_net, stage=1, latents=x0, noise=eps, timestep=idx,
                         image_condition=cond, ref_latent=ref, prompt_embeds=text, audio=None, face_embeds=face)
    loss.backward()

The DiTs are conditioned exactly as at inference (:mod:`hallo3_cli.conditioning`); training differs only where the
release does (§10.3, §10.7): the reference network reads the main DiT's caption embedding (possibly dropped)
instead of zeros, and its bank keeps its gradients, so in stage 1 the loss trains the reference network too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hallo3_cli.conditioning import DiTConditions, dit_velocity, reference_bank, zero_samples
from hallo3_cli.hub.convert import MAIN_PREFIX, REF_PREFIX, official_names
from hallo3_cli.scheduling_hallo3 import Hallo3DPMSolverSDEScheduler

#: Prefixes of the names :func:`trainable_parameters` returns, one per network.
TRANSFORMER = "transformer."
REFERENCE_NET = "reference_net."


@dataclass(frozen=True)
class TrainRule:
    """The release's rule for one stage, on official engine names (``model.diffusion_model.…`` for the main DiT,
    ``ref_model.diffusion_model.…`` for the reference network): a parameter trains iff, for some
    ``(owner, part)`` of ``train_prefix``, both are substrings of its name, and no ``not_trainable`` entry is.
    Substrings, as the release matches them: ``'model'`` also matches ``'ref_model.…'`` and ``'attention'`` also
    matches ``post_attention_layernorm`` (docs/model.md §10.4, §10.9)."""

    train_prefix: dict[str, tuple[str, ...]]
    not_trainable: tuple[str, ...]

    def trains(self, official_name: str) -> bool:
        if any(part in official_name for part in self.not_trainable):
            return False
        return any(owner in official_name and part in official_name
                   for owner, parts in self.train_prefix.items() for part in parts)


#: configs/cogvideox_5b_i2v_s1.yaml and _s2.yaml (docs/model.md §10.4).
RELEASE_RULES = {
    1: TrainRule({"ref_model": ("attention",), "model": ("face", "attention")}, ("audio",)),
    2: TrainRule({"model": ("audio",)}, ("ref_model",)),
}


def _check_stage(stage) -> int:
    if stage not in RELEASE_RULES:
        raise ValueError(f"stage must be 1 or 2, got {stage!r}")
    return stage


def official_parameter_names(transformer, reference_net) -> dict[str, str]:
    """Every parameter of both networks (``transformer.…`` / ``reference_net.…``) → the official engine name of
    the tensor it comes from, through the converter's mapping (:func:`hallo3_cli.hub.convert.official_names`).
    Several of ours can share one official name (``to_q``/``to_k``/``to_v`` ← ``query_key_value``)."""
    names = {}
    for label, model, prefix in ((TRANSFORMER, transformer, MAIN_PREFIX), (REFERENCE_NET, reference_net, REF_PREFIX)):
        shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
        adapted = [name for name in shapes if "lora_" in name or ".base_layer." in name]
        if adapted:
            raise ValueError(f"{type(model).__name__} carries adapters ({adapted[0]}, …): the release's trainable "
                             "set is defined on the plain network; LoRA training trains its adapters instead")
        names.update({label + name: key for name, key in official_names(shapes, prefix).items()})
    return names


def trainable_parameters(transformer, reference_net, stage: int) -> list[tuple[str, torch.nn.Parameter]]:
    """The release's trainable set of ``stage`` (1: both DiTs' attention + the face path; 2: the audio path) as
    ``[(name, parameter)]`` in module order, names prefixed ``transformer.`` / ``reference_net.``. Sets
    ``requires_grad`` True on these and False on every other parameter of both networks."""
    rule = RELEASE_RULES[_check_stage(stage)]
    official = official_parameter_names(transformer, reference_net)
    named = []
    for label, model in ((TRANSFORMER, transformer), (REFERENCE_NET, reference_net)):
        for name, parameter in model.named_parameters():
            trains = rule.trains(official[label + name])
            parameter.requires_grad_(trains)
            if trains:
                named.append((label + name, parameter))
    return named


@dataclass
class TrainingForward:
    """One training forward: ``loss`` (float32 scalar), the DiT's v-prediction ``model_output``, the ``target``
    v (float32) and the ``noisy_latents`` x_t (float32) it was computed from."""

    loss: torch.Tensor
    model_output: torch.Tensor
    target: torch.Tensor
    noisy_latents: torch.Tensor


_SCHEDULER = Hallo3DPMSolverSDEScheduler()


def _timesteps(timestep, batch: int, device) -> torch.Tensor:
    t = torch.as_tensor(timestep, device=device).reshape(-1)
    if t.is_floating_point() or t.is_complex():
        if not bool((t == t.round()).all()):
            raise ValueError(f"timestep must be integer indices into the 1000-step table, got {t.tolist()}")
        t = t.round()
    t = t.long()
    if t.numel() == 1:
        t = t.expand(batch)
    if t.numel() != batch:
        raise ValueError(f"{t.numel()} timesteps for a batch of {batch}")
    return t


def _image_condition(image_condition: torch.Tensor, latents: torch.Tensor, drop: bool | torch.Tensor) -> torch.Tensor:
    """The image condition's latent frame(s) zero-padded to the clip's latent frames (docs/model.md §10.3), zeroed
    where ``drop`` (the batch, or the samples of a (B,) bool tensor)."""
    frames = latents.shape[1]
    shape = image_condition.shape
    if image_condition.ndim != 5 or shape[0] != latents.shape[0] or shape[2:] != latents.shape[2:]:
        raise ValueError(f"image_condition {tuple(image_condition.shape)} does not fit latents {tuple(latents.shape)}")
    if image_condition.shape[1] > frames:
        raise ValueError(f"image_condition has {image_condition.shape[1]} latent frames, the clip {frames}")
    if isinstance(drop, bool) and drop:
        return torch.zeros_like(latents, dtype=image_condition.dtype)
    pad = latents.new_zeros((latents.shape[0], frames - image_condition.shape[1], *latents.shape[2:]),
                            dtype=image_condition.dtype)
    return zero_samples(torch.cat([image_condition, pad], dim=1), drop)


def training_forward(transformer, reference_net, *, stage: int, latents: torch.Tensor, noise: torch.Tensor, timestep,
                     image_condition: torch.Tensor, ref_latent: torch.Tensor, prompt_embeds: torch.Tensor,
                     face_embeds: torch.Tensor, audio: torch.Tensor | None = None, drop_text: bool | torch.Tensor = False,
                     drop_reference: bool | torch.Tensor = False, drop_audio: bool | torch.Tensor = False,
                     drop_image: bool | torch.Tensor = False,
                     attention_kwargs: dict | None = None) -> TrainingForward:
    """The release's training forward (docs/model.md §10.3, §10.5); arguments as :func:`training_loss`."""
    stage = _check_stage(stage)
    if stage == 1 and audio is not None:
        raise ValueError("stage 1 trains without the audio path (the release's stage-1 model has none): "
                         "pass audio=None")
    if stage == 2 and audio is None:
        raise ValueError("stage 2 trains the audio path: pass audio (B, 49, window, layers, channels)")
    if latents.shape != noise.shape:
        raise ValueError(f"noise {tuple(noise.shape)} does not match latents {tuple(latents.shape)}")
    batch = latents.shape[0]
    timesteps = _timesteps(timestep, batch, latents.device)
    dtype = transformer.dtype
    conditions = DiTConditions(prompt_embeds, face_embeds.to(dtype), None if audio is None else audio.to(dtype))
    conditions = conditions.dropped(text=drop_text, audio=drop_audio)

    # the reference network reads the (possibly dropped) caption, not zeros as at inference (§10.3)
    ref = zero_samples(ref_latent, drop_reference)
    ref_dtype = reference_net.dtype
    bank = reference_bank(reference_net, ref.to(ref_dtype), conditions.prompt_embeds.to(ref_dtype), attention_kwargs)

    # float32 x_t and v (the release's forward process), the networks in their own dtype (bf16 in production)
    noisy = _SCHEDULER.add_noise(latents, noise, timesteps)
    target = _SCHEDULER.get_velocity(latents, noise, timesteps)
    output = dit_velocity(
        transformer, noisy.to(dtype), timesteps, _image_condition(image_condition, latents, drop_image).to(dtype),
        prompt_embeds=conditions.prompt_embeds.to(dtype), bank=bank, face_embeds=conditions.face_embeds,
        audio_embeds=conditions.audio_embeds, attention_kwargs=attention_kwargs,
    )
    # mean over each sample, then over the batch (≡ the release's w·(D − x0)², w = 1/(1 − α²); §10.5)
    loss = (output.float() - target).square().flatten(1).mean(dim=1).mean()
    return TrainingForward(loss=loss, model_output=output, target=target, noisy_latents=noisy)


def training_loss(transformer, reference_net, *, stage: int, latents: torch.Tensor, noise: torch.Tensor, timestep,
                  image_condition: torch.Tensor, ref_latent: torch.Tensor, prompt_embeds: torch.Tensor,
                  face_embeds: torch.Tensor, audio: torch.Tensor | None = None, drop_text: bool | torch.Tensor = False,
                  drop_reference: bool | torch.Tensor = False, drop_audio: bool | torch.Tensor = False,
                  drop_image: bool | torch.Tensor = False,
                  attention_kwargs: dict | None = None) -> torch.Tensor:
    """The release's loss of one batch, a float32 scalar: ``mean((F − v)²)`` with ``F`` the main DiT's
    v-prediction at ``x_t = α·x0 + √(1 − α²)·ε`` and ``v = α·ε − √(1 − α²)·x0`` (α from the full 1000-step
    zero-SNR table, docs/model.md §10.5). Nothing is under ``no_grad``: call ``backward()`` on it.

    ``latents`` x0 (B, 13, 16, h, w), VAE latents ×scale; ``noise`` ε, same shape; ``timestep`` integer table
    indices (an int or (B,)), also the network timestep; ``image_condition`` (B, 1, 16, h, w) the latent of
    [reference, motion frames], zero-padded here to the clip; ``ref_latent`` (B, 1, 16, h, w) the masked reference
    latent; ``prompt_embeds`` (B, L, D) T5 output; ``face_embeds`` (B, 512), never dropped; ``audio``
    (B, 49, window, layers, channels) windowed wav2vec features in stage 2, None in stage 1 (no audio path).
    ``drop_*``: the release's condition dropout (§10.3), for the whole batch (a bool) or per sample (a (B,) bool
    tensor, as :func:`~hallo3_cli.training.conditions.step_inputs` draws them): text → zeros (for both DiTs),
    reference latent → zeros, audio → zero features, image condition → zeros.
    """
    return training_forward(
        transformer, reference_net, stage=stage, latents=latents, noise=noise, timestep=timestep,
        image_condition=image_condition, ref_latent=ref_latent, prompt_embeds=prompt_embeds, face_embeds=face_embeds,
        audio=audio, drop_text=drop_text, drop_reference=drop_reference, drop_audio=drop_audio,
        drop_image=drop_image, attention_kwargs=attention_kwargs,
    ).loss
