"""Attention processors of the Hallo3 DiTs (swappable, diffusers-style).

Both take every extra argument explicitly: diffusers' ``Attention.forward`` silently drops keyword
arguments that a processor's ``__call__`` does not declare (docs/model.md §8b.10).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import apply_rotary_emb


def _heads(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    """(B, N, heads·d) → (B, heads, N, d)."""
    return x.unflatten(-1, (attn.heads, -1)).transpose(1, 2)


class Hallo3SelfAttnProcessor:
    """Joint self-attention over ``[text | video]`` plus the reference-network bank as extra keys.

    - qk-LayerNorm on every token, RoPE on the video slice only (docs/model.md §2.2).
    - The reference tokens go through this layer's ``to_k``/``to_v`` and ``norm_k`` without RoPE.
      The official code also gives them query rows and then discards those outputs; appending them
      only as keys/values is numerically identical and saves one frame of queries (docs/model.md §8b.6).
    """

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        ref_states: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if attention_mask is not None:
            raise ValueError("Hallo3SelfAttnProcessor does not support attention masks")
        text_length = encoder_hidden_states.shape[1]
        query, key, value = self.project(attn, hidden_states, encoder_hidden_states, image_rotary_emb, ref_states)
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).flatten(2)
        out = attn.to_out[1](attn.to_out[0](out))
        encoder_out, video_out = out.split([text_length, out.shape[1] - text_length], dim=1)
        return video_out, encoder_out

    @staticmethod
    def project(
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None,
        ref_states: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Query of ``[text | video]``, keys/values of ``[text | video | ref]``, each (B, heads, tokens, d)."""
        text_length = encoder_hidden_states.shape[1]
        tokens = torch.cat([encoder_hidden_states, hidden_states], dim=1)

        query = _heads(attn, attn.to_q(tokens))
        key = _heads(attn, attn.to_k(tokens))
        value = _heads(attn, attn.to_v(tokens))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
            key = attn.norm_k(key)
        if image_rotary_emb is not None:
            query[:, :, text_length:] = apply_rotary_emb(query[:, :, text_length:], image_rotary_emb)
            key[:, :, text_length:] = apply_rotary_emb(key[:, :, text_length:], image_rotary_emb)

        if ref_states is not None:
            # A bank shared by the batch (the CFG halves) is projected once, then broadcast.
            ref_states = ref_states.to(tokens.dtype)
            ref_key = _heads(attn, attn.to_k(ref_states))
            if attn.norm_k is not None:
                ref_key = attn.norm_k(ref_key)
            ref_value = _heads(attn, attn.to_v(ref_states))
            batch = tokens.shape[0]
            key = torch.cat([key, ref_key.expand(batch, -1, -1, -1)], dim=2)
            value = torch.cat([value, ref_value.expand(batch, -1, -1, -1)], dim=2)

        return query, key, value


class Hallo3CrossAttnProcessor:
    """Face / audio cross-attention (docs/model.md §2.3–2.4, §8b.7).

    The query and the keys use the layer's self-attention q/k LayerNorms (passed in as
    ``norm_q``/``norm_k`` rather than registered twice: safetensors refuses shared tensors), and the
    query gets the rotary embedding of the first latent frame; keys get none.
    """

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        query_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        norm_q: torch.nn.Module | None = None,
        norm_k: torch.nn.Module | None = None,
    ) -> torch.Tensor:
        if attention_mask is not None:
            raise ValueError("Hallo3CrossAttnProcessor does not support attention masks")
        query, key, value = self.project(attn, hidden_states, encoder_hidden_states, query_rotary_emb, norm_q, norm_k)
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).flatten(2)
        return attn.to_out[1](attn.to_out[0](out))

    @staticmethod
    def project(
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        query_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None,
        norm_q: torch.nn.Module | None,
        norm_k: torch.nn.Module | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Query (qk-LayerNorm, RoPE), key (qk-LayerNorm) and value, each (B, heads, tokens, d)."""
        query = _heads(attn, attn.to_q(hidden_states))
        key = _heads(attn, attn.to_k(encoder_hidden_states))
        value = _heads(attn, attn.to_v(encoder_hidden_states))
        if norm_q is not None:
            query = norm_q(query)
        if norm_k is not None:
            key = norm_k(key)
        if query_rotary_emb is not None:
            query = apply_rotary_emb(query, query_rotary_emb)
        return query, key, value


class Hallo3FoldedCrossAttnProcessor(Hallo3CrossAttnProcessor):
    """:class:`Hallo3CrossAttnProcessor` with the output projection folded into the values.

    Each query row's result is a softmax mix of the K context rows, so
    ``to_out(Σ_k p_k·v_k) = Σ_k p_k·(v_k·W_out) + bias``. Projecting the K value rows of every head
    costs O(K·d²) per latent frame instead of O(N·d²) for its N video tokens; with Hallo3's short
    contexts (4 face, 32 audio tokens) this drops most of the cost of the two cross-attention output
    projections. Same maths, other summation order. The scores are a (batch, heads, N, K) tensor:
    linear in N. Used when ``heads·K < dim`` and the output weight is a plain tensor on the compute
    device in the compute dtype; otherwise (offload hooks that load weights inside the module call,
    fp8 storage, a LoRA adapter on the output projection, long contexts) it takes the SDPA path of the parent class.
    """

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        query_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        norm_q: torch.nn.Module | None = None,
        norm_k: torch.nn.Module | None = None,
    ) -> torch.Tensor:
        out_proj = attn.to_out[0]
        weight = out_proj.weight
        foldable = (
            type(out_proj) is torch.nn.Linear  # not a LoRA-wrapped layer: its adapter must run in its own call
            and attention_mask is None
            and attn.heads * encoder_hidden_states.shape[1] < weight.shape[1]
            and weight.device == hidden_states.device
            and weight.dtype == hidden_states.dtype
        )
        if not foldable:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, query_rotary_emb, norm_q, norm_k)
        query, key, value = self.project(attn, hidden_states, encoder_hidden_states, query_rotary_emb, norm_q, norm_k)
        scores = torch.matmul(query, key.transpose(-1, -2)) * (query.shape[-1] ** -0.5)
        probs = scores.softmax(-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(query.dtype)  # (B, heads, N, K)
        folded = torch.einsum("bhkd,ohd->bhko", value, weight.unflatten(1, (attn.heads, -1)))  # (B, heads, K, out)
        batch, heads, tokens, context = probs.shape
        probs = probs.transpose(1, 2).reshape(batch, tokens, heads * context)
        folded = folded.reshape(batch, heads * context, -1)
        if out_proj.bias is None:
            out = torch.bmm(probs, folded)
        else:
            out = torch.baddbmm(out_proj.bias, probs, folded)
        return attn.to_out[1](out)
