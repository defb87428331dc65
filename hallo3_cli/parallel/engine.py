"""Install CFG and sequence parallelism on a :class:`~hallo3_cli.models.Hallo3Transformer3DModel`.

``parallelize_transformer(model, config)`` leaves the model's call signature and results as they
are: the batch-2 CFG call ``model(hidden_states=..., ..., return_dict=False)`` returns the full
batch-2 v-prediction on every rank. It registers module hooks (in the manner of diffusers'
``_cp_plan``) and swaps attention processors:

- model pre-hook: CFG rank ``c`` keeps batch row ``c`` of every input; the token layout of this
  call is computed from the input shapes;
- pre-hook of every block: the first block's text and video tokens, every block's RoPE rows,
  reference-bank entry and face/audio contexts are cut to this rank's shard;
- post-hook of ``proj_out``: the video tokens are all-gathered over the sequence ranks;
- model post-hook: the two CFG halves are all-gathered.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass

import torch

from hallo3_cli.errors import Hallo3Error
from hallo3_cli.parallel.mesh import ParallelConfig
from hallo3_cli.parallel.processors import (
    Hallo3SequenceParallelCrossAttnProcessor,
    Hallo3SequenceParallelSelfAttnProcessor,
    all_gather as _all_gather,
    gather_heads,
    gather_tokens,
    scatter_heads,
)


def split_sizes(length: int, parts: int) -> list[int]:
    """``length`` items in ``parts`` contiguous shards, the first ones one longer (as ``tensor_split``)."""
    base, extra = divmod(length, parts)
    return [base + (i < extra) for i in range(parts)]


def _span(counts: list[int], rank: int) -> tuple[int, int]:
    """``[start, stop)`` of shard ``rank`` when shards of ``counts`` items follow each other."""
    start = sum(counts[:rank])
    return start, start + counts[rank]


@dataclass(frozen=True)
class SequenceLayout:
    """Which tokens of one forward each sequence rank holds.

    The joint ``[text | video]`` sequence is cut into ``parts`` contiguous shards (a shard may hold
    text and video, and video of several latent frames); the reference bank (keys/values only) into
    ``parts`` shards of its own.
    """

    text: int
    video: int
    ref: int
    tokens_per_frame: int
    parts: int

    @property
    def query_counts(self) -> list[int]:
        return split_sizes(self.text + self.video, self.parts)

    @property
    def ref_counts(self) -> list[int]:
        return split_sizes(self.ref, self.parts)

    @property
    def key_counts(self) -> list[int]:
        return [q + r for q, r in zip(self.query_counts, self.ref_counts)]

    def joint(self, rank: int) -> tuple[int, int]:
        return _span(self.query_counts, rank)

    def text_range(self, rank: int) -> tuple[int, int]:
        start, stop = self.joint(rank)
        return min(start, self.text), min(stop, self.text)

    def video_range(self, rank: int) -> tuple[int, int]:
        start, stop = self.joint(rank)
        return max(start, self.text) - self.text, max(stop, self.text) - self.text

    @property
    def video_counts(self) -> list[int]:
        return [b - a for a, b in map(self.video_range, range(self.parts))]

    def ref_range(self, rank: int) -> tuple[int, int]:
        return _span(self.ref_counts, rank)

    def frames(self, rank: int) -> tuple[int, int]:
        """Latent frames ``[first, stop)`` touched by the rank's video tokens."""
        start, stop = self.video_range(rank)
        if start == stop:
            return 0, 0
        return start // self.tokens_per_frame, (stop - 1) // self.tokens_per_frame + 1

    def segments(self, rank: int) -> list[tuple[int, int, int]]:
        """``(start, stop, frame)`` per latent frame of the rank's video tokens; start/stop are local
        token indices, ``frame`` counts from the rank's first frame."""
        start, stop = self.video_range(rank)
        first, end = self.frames(rank)
        tpf = self.tokens_per_frame
        return [(max(start, f * tpf) - start, min(stop, (f + 1) * tpf) - start, f - first) for f in range(first, end)]


_CFG_BATCHED = ("hidden_states", "encoder_hidden_states", "audio_embeds", "face_embeds", "audio_tokens", "face_tokens")


def split_cfg_inputs(kwargs: dict, half: int) -> dict:
    """The batch-2 CFG call's inputs reduced to batch row ``half`` (0 = unconditional).

    Inputs of batch 1 (a reference bank shared by both halves, one timestep) are kept as they are.
    """
    out = dict(kwargs)
    batch = kwargs["hidden_states"].shape[0]
    if batch != 2:
        raise ValueError(f"CFG parallel needs the batch-2 CFG call, got batch {batch}")

    def pick(x):
        return x[half:half + 1] if isinstance(x, torch.Tensor) and x.ndim and x.shape[0] == 2 else x

    for name in _CFG_BATCHED:
        out[name] = pick(kwargs.get(name))
    out["timestep"] = pick(kwargs.get("timestep"))
    if kwargs.get("ref_states") is not None:
        out["ref_states"] = [pick(x) for x in kwargs["ref_states"]]
    return out


class SequenceParallel:
    """The installed parallel state of one transformer; :meth:`remove` restores the model.

    Also the object the processors ask for the current call's collectives (:meth:`distribute`,
    :meth:`collect`) and frame segments.
    """

    def __init__(self, model: torch.nn.Module, config: ParallelConfig):
        self.model = model
        self.config = config
        degrees = config.degrees
        heads = model.config.num_attention_heads
        if heads % degrees.ulysses:
            raise Hallo3Error(f"ulysses degree {degrees.ulysses} does not divide the model's {heads} heads")
        if getattr(model, "is_cache_enabled", False):
            # Each rank would decide on its own shard or half whether to skip blocks: ranks would disagree.
            raise Hallo3Error("First Block Cache (--cache) does not work with --parallel video yet")
        self.layout: SequenceLayout | None = None
        self.segments: list[tuple[int, int, int]] = []
        self._static: dict[str, tuple[object, object]] = {}
        self._handles = []
        self._processors = []
        self._signature = inspect.signature(type(model).forward)
        if degrees.cfg > 1 or degrees.sequence > 1:
            self._handles.append(model.register_forward_pre_hook(self._model_pre, with_kwargs=True))
            self._handles.append(model.register_forward_hook(self._model_post, with_kwargs=True))
        if degrees.sequence > 1:
            for index, block in enumerate(model.transformer_blocks):
                self._handles.append(block.register_forward_pre_hook(self._block_pre(index == 0), with_kwargs=True))
                self._swap(block.attn1, Hallo3SequenceParallelSelfAttnProcessor(self))
                if block.has_cross_attention:
                    for attn in (block.attn_face, block.attn_audio):
                        self._swap(attn, Hallo3SequenceParallelCrossAttnProcessor(self, attn.processor))
            self._handles.append(model.proj_out.register_forward_hook(self._gather_video))

    # -- install / remove ------------------------------------------------------------------
    def _swap(self, attn, processor) -> None:
        self._processors.append((attn, attn.processor))
        attn.set_processor(processor)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        for attn, processor in reversed(self._processors):
            attn.set_processor(processor)
        self._handles.clear()
        self._processors.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()

    # -- collectives for the processors -------------------------------------------------------
    @property
    def _ulysses(self) -> tuple[int, int]:
        return self.config.local_rank("ring"), self.config.local_rank("ulysses")

    def _group_counts(self, counts: list[int]) -> list[int]:
        """Counts of the members of this rank's Ulysses group."""
        u = self.config.degrees.ulysses
        ring, _ = self._ulysses
        return counts[ring * u:(ring + 1) * u]

    def _ring_counts(self, counts: list[int]) -> list[int]:
        """Token totals of each ring member's Ulysses group."""
        u = self.config.degrees.ulysses
        return [sum(counts[i * u:(i + 1) * u]) for i in range(self.config.degrees.ring)]

    def distribute(self, query: torch.Tensor, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Local ``query (B, n, H, d)`` and ``kv (2, B, n + m, H, d)`` → the Ulysses group's queries
        and every rank's keys/values, for this rank's heads."""
        degrees, layout = self.config.degrees, self.layout
        if degrees.ulysses > 1:
            group = self.config.group("ulysses")
            query = scatter_heads(query, self._group_counts(layout.query_counts), group)
            kv = scatter_heads(kv, self._group_counts(layout.key_counts), group)
        if degrees.ring > 1:
            kv = gather_tokens(kv, self._ring_counts(layout.key_counts), self.config.group("ring"), dim=2)
        return query, kv

    def collect(self, out: torch.Tensor) -> torch.Tensor:
        """Attention output of the Ulysses group's queries → this rank's tokens, all heads."""
        if self.config.degrees.ulysses == 1:
            return out
        _, member = self._ulysses
        return gather_heads(out, self._group_counts(self.layout.query_counts), member, self.config.group("ulysses"))

    # -- hooks ------------------------------------------------------------------------------------
    def _model_pre(self, module, args, kwargs):
        bound = self._signature.bind(module, *args, **kwargs)
        kwargs = dict(bound.arguments)
        kwargs.pop("self", None)
        kwargs.pop(next(iter(self._signature.parameters)), None)
        self.layout = None
        if kwargs.get("hidden_states") is None:  # projections only (project_audio / project_face)
            return None
        if self.config.degrees.cfg > 1:
            kwargs = split_cfg_inputs(kwargs, self.config.cfg_rank)
        if self.config.degrees.sequence > 1:
            _, frames, _, height, width = kwargs["hidden_states"].shape
            p = module.config.patch_size
            tpf = (height // p) * (width // p)
            ref = kwargs.get("ref_states")
            self.layout = SequenceLayout(
                text=kwargs["encoder_hidden_states"].shape[1], video=frames * tpf,
                ref=ref[0].shape[1] if ref else 0, tokens_per_frame=tpf, parts=self.config.degrees.sequence,
            )
            self.segments = self.layout.segments(self.config.sequence_rank)
            self._static.clear()
        return (), kwargs

    def _model_post(self, module, args, kwargs, output):
        self.layout = None  # nothing of this call's layout may leak into a later one
        if kwargs.get("hidden_states") is None or self.config.degrees.cfg == 1:
            return None
        group = self.config.group("cfg")
        if isinstance(output, tuple):
            return (_all_gather(output[0].contiguous(), 0, group),) + tuple(output[1:])
        output.sample = _all_gather(output.sample.contiguous(), 0, group)
        return output

    def _block_pre(self, first: bool):
        def hook(module, args, kwargs):
            if self.layout is None:
                return None
            if args:
                raise ValueError("a sequence-parallel Hallo3Block takes keyword arguments only")
            kwargs = dict(kwargs)
            layout, rank = self.layout, self.config.sequence_rank
            if first:
                t0, t1 = layout.text_range(rank)
                v0, v1 = layout.video_range(rank)
                kwargs["hidden_states"] = kwargs["hidden_states"][:, v0:v1]
                kwargs["encoder_hidden_states"] = kwargs["encoder_hidden_states"][:, t0:t1]
            for name in ("image_rotary_emb", "query_rotary_emb", "face_tokens", "audio_tokens"):
                if kwargs.get(name) is not None:
                    kwargs[name] = self._shard_static(name, kwargs[name], batch=kwargs["temb"].shape[0])
            if kwargs.get("ref_states") is not None:
                r0, r1 = layout.ref_range(rank)
                kwargs["ref_states"] = kwargs["ref_states"][:, r0:r1]
            return (), kwargs

        return hook

    def _shard_static(self, name: str, value, batch: int):
        """Inputs every block gets unchanged, cut once per forward."""
        cached = self._static.get(name)
        if cached is not None and cached[0] is value:
            return cached[1]
        layout, rank = self.layout, self.config.sequence_rank
        v0, v1 = layout.video_range(rank)
        if v0 == v1:  # no video tokens here: nothing to rotate, no frames to attend
            out = None if name.endswith("rotary_emb") else value.new_zeros(batch, 0, value.shape[-1])
        elif name == "image_rotary_emb":
            out = tuple(x[v0:v1] for x in value)
        elif name == "query_rotary_emb":  # frame-0 rows: each token gets the row of its place in its frame
            index = torch.arange(v0, v1, device=value[0].device) % layout.tokens_per_frame
            out = tuple(x[index] for x in value)
        else:  # (B·frames, K, C) → (B, frames of the shard · K, C)
            f0, f1 = layout.frames(rank)
            out = value.unflatten(0, (batch, -1))[:, f0:f1].flatten(1, 2)
        self._static[name] = (value, out)
        return out

    def _gather_video(self, module, args, output):
        if self.layout is None:
            return None
        counts = self.layout.video_counts
        u = self.config.degrees.ulysses
        ring, member = self._ulysses
        if u > 1:  # within the Ulysses group, then across the ring: sequence order
            output = gather_tokens(output, counts[ring * u:(ring + 1) * u], self.config.group("ulysses"), dim=1)
        if self.config.degrees.ring > 1:
            output = gather_tokens(output, self._ring_counts(counts), self.config.group("ring"), dim=1)
        return output


def parallelize_transformer(model: torch.nn.Module, config: ParallelConfig) -> SequenceParallel:
    """Make ``model``'s calls CFG- and sequence-parallel over ``config``'s mesh (same signature, same
    result on every rank). Returns the installed state; ``.remove()`` (or ``with``) undoes it."""
    return SequenceParallel(model, config)


@contextlib.contextmanager
def parallel_transformer(model: torch.nn.Module, config: ParallelConfig):
    """``with parallel_transformer(model, config): ...`` — parallel inside, restored after."""
    state = parallelize_transformer(model, config)
    try:
        yield model
    finally:
        state.remove()
