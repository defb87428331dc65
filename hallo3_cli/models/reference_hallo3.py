"""Hallo3's reference network: the identity DiT whose per-layer features feed the main DiT (docs/model.md §3)."""

from __future__ import annotations

from typing import Any

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401  (DiffusionPipeline.from_pretrained looks it up here)
from diffusers.utils import apply_lora_scale

from hallo3_cli.models.transformer_hallo3 import Hallo3DiTMixin


class Hallo3ReferenceNet(Hallo3DiTMixin):
    """The reference DiT (same as the main DiT without face/audio modules).

    Call convention::

        ref_states = reference(hidden_states=ref_latent,   # (B, 1, 16, H, W), VAE latent ×0.7
                               encoder_hidden_states=text) # (B, 226, text_embed_dim): zeros at inference,
                                                           # the caption embedding in training
        # -> list with one (B, H·W/4, D) tensor per layer

    The input is ``cat([ref, ref])`` on channels at timestep 0 (docs/model.md §3). Each layer's entry is the
    adaLN-modulated video input of its self-attention. The network's final output is unused by Hallo3, so the
    forward pass stops after the last layer's modulation; the final layers are still part of the checkpoint
    and of this module (and, in training, receive no gradient).
    """

    @register_to_config
    def __init__(
        self,
        num_attention_heads: int = 48,
        attention_head_dim: int = 64,
        in_channels: int = 32,
        out_channels: int = 16,
        time_embed_dim: int = 512,
        text_embed_dim: int = 4096,
        num_layers: int = 42,
        sample_width: int = 90,
        sample_height: int = 60,
        sample_frames: int = 49,
        patch_size: int = 2,
        temporal_compression_ratio: int = 4,
        max_text_seq_length: int = 226,
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        self._build(num_layers=num_layers)

    @apply_lora_scale("attention_kwargs")
    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        timestep: torch.Tensor | float = 0.0,
        attention_kwargs: dict[str, Any] | None = None,
    ) -> list[torch.Tensor]:
        if hidden_states.shape[2] * 2 == self.config.in_channels:
            hidden_states = torch.cat([hidden_states, hidden_states], dim=2)
        hidden, text, temb, rope = self._prepare(hidden_states, encoder_hidden_states, timestep)
        bank = []
        last = len(self.transformer_blocks) - 1
        for index, block in enumerate(self.transformer_blocks):
            hidden, text, entry = self._run_block(
                block,
                hidden_states=hidden,
                encoder_hidden_states=text,
                temb=temb,
                image_rotary_emb=rope,
                attention_kwargs=attention_kwargs,
                bank_only=index == last,
            )
            bank.append(entry)
        return bank
