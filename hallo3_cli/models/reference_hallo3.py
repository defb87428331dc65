"""Hallo3's reference network: the identity DiT whose per-layer features feed the main DiT (SPEC §3)."""

from __future__ import annotations

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401  (DiffusionPipeline.from_pretrained looks it up here)
from diffusers.models.transformers.cogvideox_transformer_3d import CogVideoXTransformer3DModel

from hallo3_cli.models.transformer_hallo3 import Hallo3DiTMixin


class Hallo3ReferenceNet(Hallo3DiTMixin, CogVideoXTransformer3DModel):
    """The reference DiT (same as the main DiT without face/audio modules).

    Call convention::

        ref_states = reference(hidden_states=ref_latent,           # (B, 1, 16, H, W), VAE latent ×0.7
                               encoder_hidden_states=text_uncond)  # (B, 226, text_embed_dim), zeros
        # -> list with one (B, H·W/4, D) tensor per layer

    The input is ``cat([ref, ref])`` on channels at timestep 0 (SPEC §3). Each layer's entry is the
    adaLN-modulated video input of its self-attention. The network's final output is unused by
    Hallo3, so the forward pass stops after the last layer's modulation; the final layers are
    still part of the checkpoint and of this module.
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
        self._build_common(num_layers=num_layers)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        timestep: torch.Tensor | float = 0.0,
    ) -> list[torch.Tensor]:
        batch = hidden_states.shape[0]
        if hidden_states.shape[2] * 2 == self.config.in_channels:
            hidden_states = torch.cat([hidden_states, hidden_states], dim=2)
        dtype = hidden_states.dtype
        timestep = torch.as_tensor(timestep, device=hidden_states.device, dtype=torch.float32).reshape(-1).expand(batch)
        temb = self.time_embedding_of(timestep, dtype)
        hidden, text = self._embed(hidden_states, encoder_hidden_states.to(dtype))
        rope = self.rotary_embedding(hidden_states)

        bank = []
        last = len(self.transformer_blocks) - 1
        for index, block in enumerate(self.transformer_blocks):
            hidden, text, entry = block(
                hidden_states=hidden,
                encoder_hidden_states=text,
                temb=temb,
                image_rotary_emb=rope,
                bank_only=index == last,
            )
            bank.append(entry)
        return bank
