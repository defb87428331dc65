"""Sequence-parallel attention processors for the Hallo3 DiT, and the collectives they use.

Each rank holds a contiguous shard of the joint ``[text | video]`` tokens (and a shard of the
reference bank, which only contributes keys/values). The processors are swapped in by
:func:`hallo3_cli.parallel.engine.parallelize_transformer`, which also shards their inputs; see the
package docstring for why the collectives are ours rather than diffusers' context-parallel hooks.
"""

from __future__ import annotations

import math

import torch
import torch.distributed._functional_collectives as funcol
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.attention_processor import Attention

from hallo3_cli.models.attention_processor import Hallo3SelfAttnProcessor


# ---------------------------------------------------------------------------------------------
# collectives (functional, so they also trace under torch.compile)

#: Concatenating all-gather (named ``all_gather_single`` from torch 2.12 on, ``all_gather_tensor`` before).
all_gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor


def scatter_heads(x: torch.Tensor, counts: list[int], group) -> torch.Tensor:
    """Ulysses, forward: ``(*lead, my tokens, H, d)`` → ``(*lead, Σ counts, H/u, d)``.

    Member ``j`` of the ``u``-rank group receives head chunk ``j`` of everyone's tokens, in member
    order. Token counts may differ by member (uneven ``all_to_all_single``).
    """
    u = len(counts)
    *lead, tokens, heads, dim = x.shape
    per_token = math.prod(lead) * (heads // u) * dim
    send = x.unflatten(-2, (u, heads // u)).movedim(-3, 0).contiguous()  # (u, *lead, tokens, H/u, d)
    received = funcol.all_to_all_single(send.flatten(), [c * per_token for c in counts], [tokens * per_token] * u, group)
    parts = received.split([c * per_token for c in counts])
    return torch.cat([p.view(*lead, c, heads // u, dim) for p, c in zip(parts, counts)], dim=-3)


def gather_heads(x: torch.Tensor, counts: list[int], member: int, group) -> torch.Tensor:
    """Ulysses, backward: ``(*lead, Σ counts, H/u, d)`` → ``(*lead, counts[member], H, d)``."""
    u = len(counts)
    *lead, _, heads, dim = x.shape
    per_token = math.prod(lead) * heads * dim
    send = torch.cat([p.flatten() for p in x.split(counts, dim=-3)])
    mine = counts[member]
    received = funcol.all_to_all_single(send, [mine * per_token] * u, [c * per_token for c in counts], group)
    return received.view(u, *lead, mine, heads, dim).movedim(0, -3).flatten(-3, -2)


def gather_tokens(x: torch.Tensor, counts: list[int], group, dim: int) -> torch.Tensor:
    """All-gather of uneven shards along ``dim`` (member order): each pads to the longest shard
    (gloo refuses uneven all-gathers), then the padding is cut."""
    dim = dim % x.ndim
    longest = max(counts)
    if x.shape[dim] < longest:
        pad = x.new_zeros(*x.shape[:dim], longest - x.shape[dim], *x.shape[dim + 1:])
        x = torch.cat([x, pad], dim=dim)
    gathered = all_gather(x.unsqueeze(0).contiguous(), 0, group)
    return torch.cat([gathered[i].narrow(dim, 0, c) for i, c in enumerate(counts)], dim=dim)


# ---------------------------------------------------------------------------------------------
# processors


class Hallo3SequenceParallelSelfAttnProcessor:
    """:class:`~hallo3_cli.models.attention_processor.Hallo3SelfAttnProcessor` on a token shard.

    The rank projects its own ``[text | video]`` tokens (RoPE from the video rows of its shard) and
    its slice of the reference bank, then: Ulysses all-to-all (this rank keeps ``H/u`` heads of the
    whole Ulysses group's tokens), ring all-gather of the group's keys/values (padded to equal
    length), attention of the local queries against every key through diffusers'
    ``dispatch_attention_fn`` (so ``set_attention_backend`` applies), all-to-all back, output
    projection on the shard. Softmax attention is permutation-invariant over keys, so where the
    reference keys sit in the gathered sequence does not matter.
    """

    _attention_backend = None
    _parallel_config = None  # diffusers' own context parallelism stays off: the collectives are ours

    def __init__(self, engine):
        self.engine = engine

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
            raise ValueError("Hallo3SequenceParallelSelfAttnProcessor does not support attention masks")
        text_length = encoder_hidden_states.shape[1]
        query, key, value = Hallo3SelfAttnProcessor.project(attn, hidden_states, encoder_hidden_states, image_rotary_emb, ref_states)
        query = query.transpose(1, 2)  # (B, tokens, heads, d): the dispatcher's layout
        kv = torch.stack([key, value]).transpose(2, 3)  # (2, B, keys, heads, d)
        engine = self.engine
        query, kv = engine.distribute(query, kv)
        out = dispatch_attention_fn(query, kv[0], kv[1], backend=self._attention_backend)
        out = engine.collect(out).flatten(2)
        out = attn.to_out[1](attn.to_out[0](out))
        return out[:, text_length:], out[:, :text_length]


class Hallo3SequenceParallelCrossAttnProcessor:
    """The per-frame face/audio cross-attention on a token shard that may straddle latent frames.

    The block hands over the shard's video tokens and the contexts of the frames they cover,
    concatenated ``(B, frames_in_shard·K, C)``, and per-token RoPE rows. Each run of tokens of one
    latent frame (found from the tokens' global positions, not by reshaping) attends to its
    frame's K context tokens through the layer's own processor, so the maths per token is the
    single-process one (folded or SDPA).
    """

    def __init__(self, engine, inner):
        self.engine = engine
        self.inner = inner

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
        segments = self.engine.segments
        if not segments:  # a shard of text only
            return hidden_states
        per_frame = encoder_hidden_states.shape[1] // len(segments)
        outs = []
        for start, stop, frame in segments:
            rope = None if query_rotary_emb is None else (query_rotary_emb[0][start:stop], query_rotary_emb[1][start:stop])
            context = encoder_hidden_states[:, frame * per_frame:(frame + 1) * per_frame]
            outs.append(self.inner(attn, hidden_states[:, start:stop], context, attention_mask, rope, norm_q, norm_k))
        return torch.cat(outs, dim=1)
