"""Building blocks shared by the Hallo3 main DiT and reference network, extending diffusers' CogVideoX."""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import CogVideoXPatchEmbed, get_3d_rotary_pos_embed
from diffusers.models.transformers.cogvideox_transformer_3d import CogVideoXBlock
from diffusers.utils.torch_utils import maybe_allow_in_graph
from torch import nn

from hallo3_cli.models.attention_processor import Hallo3FoldedCrossAttnProcessor, Hallo3SelfAttnProcessor


class Hallo3PatchEmbed(CogVideoXPatchEmbed):
    """CogVideoX patch embedding that always adds the learned positional table.

    diffusers replaces the learned table with fresh sin-cos whenever the latent frame count is not the
    configured one; the 1-frame reference pass would silently hit that. The official code always adds
    ``pos_embedding[:, :text + video_tokens]`` (docs/model.md §8b.1). The table is float32 (diffusers: float64).
    """

    def __init__(self, *args, **kwargs):
        kwargs.update(use_positional_embeddings=False, use_learned_positional_embeddings=True)
        super().__init__(*args, **kwargs)
        # Switch off the parent's positional logic in forward; this class adds the table itself.
        self.use_positional_embeddings = False
        self.use_learned_positional_embeddings = False

    def _get_positional_embeddings(self, sample_height, sample_width, sample_frames, device=None):
        frames = (sample_frames - 1) // self.temporal_compression_ratio + 1
        tokens = (sample_height // self.patch_size) * (sample_width // self.patch_size) * frames
        return torch.zeros(1, self.max_text_seq_length + tokens, self.embed_dim, device=device)  # loaded later

    def forward(self, text_embeds: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        embeds = super().forward(text_embeds, image_embeds)
        if embeds.shape[1] > self.pos_embedding.shape[1]:
            raise ValueError(
                f"{embeds.shape[1]} tokens exceed the learned positional table ({self.pos_embedding.shape[1]}); "
                "the latent size must match the model's sample size"
            )
        return embeds + self.pos_embedding[:, : embeds.shape[1]].to(embeds.dtype)


def video_rotary_embedding(
    num_frames: int, grid_height: int, grid_width: int, head_dim: int, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """SAT's 3D RoPE for a ``num_frames × grid_height × grid_width`` token grid (docs/model.md §8b.9)."""
    cos, sin = get_3d_rotary_pos_embed(
        embed_dim=head_dim,
        crops_coords=((0, 0), (grid_height, grid_width)),
        grid_size=(grid_height, grid_width),
        temporal_size=num_frames,
        grid_type="slice",
        max_size=(grid_height, grid_width),
        device=device,
    )
    return cos, sin


@maybe_allow_in_graph
class Hallo3Block(CogVideoXBlock):
    """A CogVideoX block with Hallo3's reference keys and (main DiT only) face and audio cross-attention.

    Order (docs/model.md §2): adaLN → joint self-attention over ``[text | video]`` + reference keys → gated
    residuals → face cross-attention (no gate) → audio cross-attention (no gate) → adaLN-gated MLP.
    The modulated video input of the self-attention (``norm1``'s first output) is returned too: in the
    reference network it is the bank entry of this layer (docs/model.md §3, §8b.5).
    """

    #: The forward's arguments in order (gradient checkpointing passes them positionally).
    INPUTS = ("hidden_states", "encoder_hidden_states", "temb", "image_rotary_emb", "attention_kwargs", "ref_states",
              "face_tokens", "audio_tokens", "query_rotary_emb", "bank_only")

    def __init__(
        self,
        dim: int,
        num_attention_heads: int,
        attention_head_dim: int,
        time_embed_dim: int,
        norm_eps: float = 1e-5,
        face_cross_attention_dim: int | None = None,
        audio_cross_attention_dim: int | None = None,
    ):
        super().__init__(
            dim=dim,
            num_attention_heads=num_attention_heads,
            attention_head_dim=attention_head_dim,
            time_embed_dim=time_embed_dim,
            attention_bias=True,
            norm_eps=norm_eps,
        )
        self.attn1.set_processor(Hallo3SelfAttnProcessor())
        self.has_cross_attention = face_cross_attention_dim is not None
        if self.has_cross_attention:
            self.norm_face = nn.LayerNorm(dim, eps=norm_eps)
            self.attn_face = self._cross_attention(dim, face_cross_attention_dim, num_attention_heads, attention_head_dim)
            self.norm_audio = nn.LayerNorm(dim, eps=norm_eps)
            self.attn_audio = self._cross_attention(dim, audio_cross_attention_dim, num_attention_heads, attention_head_dim)

    @staticmethod
    def _cross_attention(dim: int, context_dim: int, heads: int, head_dim: int) -> Attention:
        # No qk_norm of its own: it borrows the self-attention's (docs/model.md §8b.7).
        return Attention(
            query_dim=dim,
            cross_attention_dim=context_dim,
            heads=heads,
            dim_head=head_dim,
            bias=True,
            out_bias=True,
            processor=Hallo3FoldedCrossAttnProcessor(),
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        temb: torch.Tensor,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_kwargs: dict[str, Any] | None = None,
        ref_states: torch.Tensor | None = None,
        face_tokens: torch.Tensor | None = None,
        audio_tokens: torch.Tensor | None = None,
        query_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        bank_only: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns ``(hidden_states, encoder_hidden_states, bank_entry)``.

        ``face_tokens``: (B·frames, tokens, C) and ``audio_tokens``: (B·frames, tokens, C), one row per
        latent frame; the video query is attended per latent frame. ``bank_only`` stops right after
        the modulation (reference network, last layer: nothing after it is used).
        """
        attention_kwargs = attention_kwargs or {}
        text_length = encoder_hidden_states.shape[1]

        norm_hidden, norm_encoder, gate_msa, enc_gate_msa = self.norm1(hidden_states, encoder_hidden_states, temb)
        if bank_only:
            return hidden_states, encoder_hidden_states, norm_hidden

        attn_hidden, attn_encoder = self.attn1(
            hidden_states=norm_hidden,
            encoder_hidden_states=norm_encoder,
            image_rotary_emb=image_rotary_emb,
            ref_states=ref_states,
            **attention_kwargs,
        )
        hidden_states = hidden_states + gate_msa * attn_hidden
        encoder_hidden_states = encoder_hidden_states + enc_gate_msa * attn_encoder

        if self.has_cross_attention:
            # No gates on the cross-attention residuals (docs/model.md §2.3–2.4).
            hidden_states = hidden_states + self._per_frame_cross_attention(
                self.attn_face, self.norm_face(hidden_states), face_tokens, query_rotary_emb
            )
            if audio_tokens is not None:  # (none: the stage-1 model of the release, which has no audio path)
                hidden_states = hidden_states + self._per_frame_cross_attention(
                    self.attn_audio, self.norm_audio(hidden_states), audio_tokens, query_rotary_emb
                )

        norm_hidden_ff, norm_encoder_ff, gate_ff, enc_gate_ff = self.norm2(hidden_states, encoder_hidden_states, temb)
        ff_output = self.ff(torch.cat([norm_encoder_ff, norm_hidden_ff], dim=1))
        hidden_states = hidden_states + gate_ff * ff_output[:, text_length:]
        encoder_hidden_states = encoder_hidden_states + enc_gate_ff * ff_output[:, :text_length]
        return hidden_states, encoder_hidden_states, norm_hidden

    def _per_frame_cross_attention(
        self,
        attn: Attention,
        query_states: torch.Tensor,
        context: torch.Tensor,
        query_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> torch.Tensor:
        batch, tokens, dim = query_states.shape
        frames = context.shape[0] // batch
        out = attn(
            query_states.reshape(batch * frames, tokens // frames, dim),
            encoder_hidden_states=context,
            query_rotary_emb=query_rotary_emb,
            norm_q=self.attn1.norm_q,
            norm_k=self.attn1.norm_k,
        )
        return out.reshape(batch, tokens, dim)


def _register_block_metadata() -> None:
    """Tell diffusers' block hooks (First Block Cache) where hidden states sit in our block's output."""
    from diffusers.hooks._helpers import TransformerBlockMetadata, TransformerBlockRegistry

    TransformerBlockRegistry.register(
        model_class=Hallo3Block,
        metadata=TransformerBlockMetadata(return_hidden_states_index=0, return_encoder_hidden_states_index=1),
    )


_register_block_metadata()
