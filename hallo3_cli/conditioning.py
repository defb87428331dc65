"""How the Hallo3 DiTs are conditioned: the one conditional call of the main DiT, the reference network's bank,
and the release's null conditions. Shared by inference (``Hallo3Pipeline``: classifier-free guidance) and
training (:mod:`hallo3_cli.training`: condition dropout); plain functions, differentiable (no ``no_grad``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class DiTConditions:
    """The main DiT's conditions besides the noisy latent and the image condition, batch first.

    ``prompt_embeds`` (B, L, D) T5 output; ``face_embeds`` (B, 512) face embedding; ``audio_embeds``
    (B, frames, window, layers, channels) windowed wav2vec features, or None: no audio path (the release's
    stage-1 model has none).
    """

    prompt_embeds: torch.Tensor
    face_embeds: torch.Tensor
    audio_embeds: torch.Tensor | None = None

    def dropped(self, *, text: bool | torch.Tensor = False, audio: bool | torch.Tensor = False) -> DiTConditions:
        """The release's null conditions: a dropped text or audio condition is zeros (the raw wav2vec features,
        before the audio projection); the face embedding is never dropped. Classifier-free guidance's
        unconditional half drops both (docs/model.md §6); training drops each with its own rate (§10.3).
        ``text``/``audio``: for the whole batch (a bool) or per sample (a (B,) bool tensor)."""
        audio_embeds = self.audio_embeds
        return dataclasses.replace(
            self,
            prompt_embeds=zero_samples(self.prompt_embeds, text),
            audio_embeds=zero_samples(audio_embeds, audio) if audio_embeds is not None else None,
        )

    def unconditional(self) -> DiTConditions:
        """The unconditional half of classifier-free guidance: text and audio dropped together."""
        return self.dropped(text=True, audio=True)


def zero_samples(tensor: torch.Tensor, drop: bool | torch.Tensor) -> torch.Tensor:
    """``tensor`` (batch first) with the samples ``drop`` selects replaced by exact zeros: ``drop`` a bool (the
    whole batch) or a (B,) bool tensor (per sample). Differentiable; a sample kept is passed through unchanged."""
    if not isinstance(drop, torch.Tensor):
        return torch.zeros_like(tensor) if drop else tensor
    if drop.dtype != torch.bool or drop.shape != tensor.shape[:1]:
        raise ValueError(f"a per-sample drop flag must be a ({tensor.shape[0]},) bool tensor, got "
                         f"{tuple(drop.shape)} {drop.dtype}")
    keep = ~drop.to(tensor.device).reshape(-1, *(1,) * (tensor.ndim - 1))
    return torch.where(keep, tensor, torch.zeros((), dtype=tensor.dtype, device=tensor.device))


def reference_bank(reference_net, ref_latent: torch.Tensor, prompt_embeds: torch.Tensor,
                   attention_kwargs: dict[str, Any] | None = None) -> list[torch.Tensor]:
    """The reference network's per-layer bank (docs/model.md §3): ``ref_latent`` (B, 1, 16, h, w) ×scale at
    timestep 0 with ``prompt_embeds`` (zeros at inference; the caption in training, §10.3)."""
    return reference_net(hidden_states=ref_latent, encoder_hidden_states=prompt_embeds, timestep=0.0,
                         attention_kwargs=attention_kwargs)


def dit_velocity(transformer, latents: torch.Tensor, timestep, image_condition: torch.Tensor, *,
                 prompt_embeds: torch.Tensor, bank: list[torch.Tensor], face_tokens: torch.Tensor | None = None,
                 face_embeds: torch.Tensor | None = None, audio_tokens: torch.Tensor | None = None,
                 audio_embeds: torch.Tensor | None = None,
                 attention_kwargs: dict[str, Any] | None = None) -> torch.Tensor:
    """THE conditional call of the main DiT: ``[noisy latent ⊕ image condition]`` (channels) → the v-prediction
    ``(B, latent_frames, 16, h, w)`` in the model's dtype. Face and audio as raw embeddings or as tokens
    already projected (once per clip when sampling); no audio at all skips the audio path."""
    return transformer(
        hidden_states=torch.cat([latents, image_condition], dim=2),
        encoder_hidden_states=prompt_embeds,
        timestep=timestep,
        audio_embeds=audio_embeds,
        face_embeds=face_embeds,
        audio_tokens=audio_tokens,
        face_tokens=face_tokens,
        ref_states=bank,
        attention_kwargs=attention_kwargs,
        return_dict=False,
    )[0]
