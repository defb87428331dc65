"""Hallo3's main DiT: CogVideoX-5B-I2V with reference keys, face and audio cross-attention (docs/model.md §2)."""

from __future__ import annotations

from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.attention import AttentionMixin
from diffusers.models.cache_utils import CacheMixin
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.normalization import AdaLayerNorm
from diffusers.utils import apply_lora_scale
from torch import nn

from hallo3_cli.models.blocks import Hallo3Block, Hallo3PatchEmbed, video_rotary_embedding
from hallo3_cli.models.projections import AudioProjModel, FaceProjModel


class Hallo3DiTMixin(ModelMixin, AttentionMixin, ConfigMixin, PeftAdapterMixin, CacheMixin):
    """What the main DiT and the reference network share: CogVideoX's layout (the same module names as
    diffusers' ``CogVideoXTransformer3DModel``, so its conversion rules and LoRA target names apply), built from
    the registered config, and the forward preamble (time embedding, patch embedding, rotary embedding).

    Trainable as any diffusers model: ``enable_gradient_checkpointing()`` (per block), the PEFT adapter API
    (``add_adapter``, ``set_adapters``, ``save_lora_adapter``/``load_lora_adapter``), a LoRA scale through
    ``attention_kwargs={"scale": s}``.
    """

    _no_split_modules = ["Hallo3Block", "Hallo3PatchEmbed"]
    _repeated_blocks = ["Hallo3Block"]  # for compile_repeated_blocks()
    _skip_layerwise_casting_patterns = ["patch_embed", "norm"]
    _supports_gradient_checkpointing = True

    def _build(self, *, num_layers: int, face_cross_attention_dim: int | None = None,
               audio_cross_attention_dim: int | None = None) -> None:
        """The modules of both DiTs from the registered config (called by each constructor)."""
        config = self.config
        inner_dim = config.num_attention_heads * config.attention_head_dim
        self.patch_embed = Hallo3PatchEmbed(
            patch_size=config.patch_size,
            in_channels=config.in_channels,
            embed_dim=inner_dim,
            text_embed_dim=config.text_embed_dim,
            sample_width=config.sample_width,
            sample_height=config.sample_height,
            sample_frames=config.sample_frames,
            temporal_compression_ratio=config.temporal_compression_ratio,
            max_text_seq_length=config.max_text_seq_length,
        )
        # Time embedding = [cos, sin] of the timestep (docs/model.md §8b.3).
        self.time_proj = Timesteps(inner_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(inner_dim, config.time_embed_dim, "silu")
        self.transformer_blocks = nn.ModuleList(
            Hallo3Block(
                dim=inner_dim,
                num_attention_heads=config.num_attention_heads,
                attention_head_dim=config.attention_head_dim,
                time_embed_dim=config.time_embed_dim,
                norm_eps=config.norm_eps,
                face_cross_attention_dim=face_cross_attention_dim,
                audio_cross_attention_dim=audio_cross_attention_dim,
            )
            for _ in range(num_layers)
        )
        self.norm_final = nn.LayerNorm(inner_dim, config.norm_eps, elementwise_affine=True)
        # The official final_layer.norm_final uses eps 1e-6, not norm_eps (docs/model.md §8b.4).
        self.norm_out = AdaLayerNorm(embedding_dim=config.time_embed_dim, output_dim=2 * inner_dim,
                                     norm_elementwise_affine=True, norm_eps=1e-6, chunk_dim=1)
        self.proj_out = nn.Linear(inner_dim, config.patch_size * config.patch_size * config.out_channels)
        self.gradient_checkpointing = False

    def time_embedding_of(self, timestep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``time_embed(timestep_embedding(t))`` (docs/model.md §2.1, §8b.3)."""
        return self.time_embedding(self.time_proj(timestep).to(dtype))

    def rotary_embedding(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _, frames, _, height, width = hidden_states.shape
        p = self.config.patch_size
        cache = getattr(self, "_rotary_cache", None)
        key = (frames, height // p, width // p, hidden_states.device)
        if cache is None or cache[0] != key:
            rope = video_rotary_embedding(frames, height // p, width // p, self.config.attention_head_dim, hidden_states.device)
            self._rotary_cache = cache = (key, rope)
        return cache[1]

    def _prepare(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, timestep):
        """The forward preamble of both DiTs: ``(video tokens, text tokens, temb, rope)``."""
        batch = hidden_states.shape[0]
        dtype = hidden_states.dtype
        timestep = torch.as_tensor(timestep, device=hidden_states.device, dtype=torch.float32).reshape(-1).expand(batch)
        temb = self.time_embedding_of(timestep, dtype)
        tokens = self.patch_embed(encoder_hidden_states.to(dtype), hidden_states)
        text_length = encoder_hidden_states.shape[1]
        # contiguous: every block then sees the same strides (no torch.compile recompilation)
        hidden, text = tokens[:, text_length:].contiguous(), tokens[:, :text_length].contiguous()
        return hidden, text, temb, self.rotary_embedding(hidden_states)

    def _run_block(self, block: Hallo3Block, **inputs) -> tuple:
        """One block; checkpointed when gradient checkpointing is on and gradients are being recorded
        (diffusers' checkpointing function takes positional arguments: passed in the block's order)."""
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            return self._gradient_checkpointing_func(block, *(inputs.get(name) for name in Hallo3Block.INPUTS))
        return block(**inputs)


class Hallo3Transformer3DModel(Hallo3DiTMixin):
    """The Hallo3 denoiser (v-prediction).

    Call convention::

        out = model(hidden_states=x,                # (B, 13, 32, H, W): noisy latent ⊕ image condition
                    encoder_hidden_states=text,     # (B, 226, text_embed_dim)
                    timestep=t,                     # (B,)
                    audio_embeds=audio,             # (B, 49, 5, layers, channels) windowed wav2vec features
                    face_embeds=face,               # (B, 512)
                    ref_states=ref_states,          # list of (B or 1, H·W/4, D), one per layer
                    return_dict=False)[0]           # -> (B, 13, 16, H, W)

    ``audio_tokens=`` / ``face_tokens=`` accept the outputs of :meth:`project_audio` /
    :meth:`project_face` instead, so a sampler can project once per clip rather than per step.
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
        audio_window: int = 5,
        audio_layers: int = 12,
        audio_channels: int = 768,
        audio_intermediate_dim: int = 512,
        audio_context_tokens: int = 32,
        audio_cross_attention_dim: int = 768,
        face_embed_dim: int = 512,
        face_tokens: int = 4,
        face_cross_attention_dim: int = 1024,
    ):
        super().__init__()
        self._build(
            num_layers=num_layers,
            face_cross_attention_dim=face_cross_attention_dim,
            audio_cross_attention_dim=audio_cross_attention_dim,
        )
        self.audio_proj = AudioProjModel(
            window=audio_window,
            layers=audio_layers,
            channels=audio_channels,
            intermediate_dim=audio_intermediate_dim,
            output_dim=audio_cross_attention_dim,
            context_tokens=audio_context_tokens,
        )
        self.face_proj = FaceProjModel(face_embed_dim, face_cross_attention_dim, face_tokens)

    def project_audio(self, audio_embeds: torch.Tensor) -> torch.Tensor:
        """(B, frames, window, layers, channels) → (B, latent_frames, tokens, dim).

        Goes through the module call (not ``self.audio_proj`` directly) so that offloading hooks
        bring the weights to the device first.
        """
        return self(audio_embeds=audio_embeds, return_dict=False)[0]

    def project_face(self, face_embeds: torch.Tensor) -> torch.Tensor:
        """(B, 512) → (B, tokens, dim) (through the module call, like :meth:`project_audio`)."""
        return self(face_embeds=face_embeds, return_dict=False)[1]

    @apply_lora_scale("attention_kwargs")
    def forward(
        self,
        hidden_states: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        timestep: torch.Tensor | float | None = None,
        audio_embeds: torch.Tensor | None = None,
        face_embeds: torch.Tensor | None = None,
        ref_states: list[torch.Tensor] | None = None,
        audio_tokens: torch.Tensor | None = None,
        face_tokens: torch.Tensor | None = None,
        attention_kwargs: dict[str, Any] | None = None,
        return_dict: bool = True,
    ) -> tuple[torch.Tensor] | Transformer2DModelOutput:
        """Without ``audio_embeds`` and ``audio_tokens`` the audio cross-attention is skipped: the release's
        stage-1 model, which has no audio path (docs/model.md §10.4). ``attention_kwargs={"scale": s}`` scales
        LoRA adapters."""
        if hidden_states is None:  # projections only: (audio_tokens, face_tokens), see project_audio()
            return (
                self.audio_proj(audio_embeds) if audio_embeds is not None else None,
                self.face_proj(face_embeds) if face_embeds is not None else None,
            )
        batch, frames, _, height, width = hidden_states.shape
        if ref_states is None or len(ref_states) != len(self.transformer_blocks):
            raise ValueError(f"ref_states must hold one tensor per layer ({len(self.transformer_blocks)})")
        if audio_tokens is None and audio_embeds is not None:
            audio_tokens = self.audio_proj(audio_embeds)
        if face_tokens is None:
            if face_embeds is None:
                raise ValueError("pass face_embeds or face_tokens")
            face_tokens = self.face_proj(face_embeds)
        if audio_tokens is not None and audio_tokens.shape[1] != frames:
            raise ValueError(f"audio gives {audio_tokens.shape[1]} latent frames, the latent has {frames}")

        dtype = hidden_states.dtype
        hidden, text, temb, rope = self._prepare(hidden_states, encoder_hidden_states, timestep)
        tokens_per_frame = hidden.shape[1] // frames
        query_rope = (rope[0][:tokens_per_frame], rope[1][:tokens_per_frame])  # frame-0 positions (docs/model.md §2.3)
        audio_context = audio_tokens.to(dtype).flatten(0, 1) if audio_tokens is not None else None  # (B·frames, tokens, dim)
        face_context = face_tokens.to(dtype).repeat_interleave(frames, dim=0)

        for block, ref in zip(self.transformer_blocks, ref_states):
            # (a First Block Cache hook may return just (hidden, text) for skipped blocks)
            hidden, text = self._run_block(
                block,
                hidden_states=hidden,
                encoder_hidden_states=text,
                temb=temb,
                image_rotary_emb=rope,
                attention_kwargs=attention_kwargs,
                ref_states=ref,
                face_tokens=face_context,
                audio_tokens=audio_context,
                query_rotary_emb=query_rope,
            )[:2]

        # final_layernorm, then the final layer's own norm_final (docs/model.md §2, "double final norm")
        hidden = self.proj_out(self.norm_out(self.norm_final(hidden), temb=temb))
        p = self.config.patch_size
        output = hidden.reshape(batch, frames, height // p, width // p, -1, p, p)
        output = output.permute(0, 1, 4, 2, 5, 3, 6).flatten(5, 6).flatten(3, 4)
        if not return_dict:
            return (output,)
        return Transformer2DModelOutput(sample=output)
