"""What a parallel denoising step costs: per-rank FLOPs, bytes communicated, predicted speed-up (pure).

The model (for ``hallo3 plan --gpus N``), per denoising step = one batch-2 CFG denoiser call:

- **compute**: every FLOP of the call scales with the number of query tokens a rank holds (linear
  layers and the MLP per token; attention = local queries × all keys; cross-attention per video
  token), so a rank does ``flops × max shard / all tokens / cfg``; time = FLOPs / ``tflops``.
- **communication**, bytes each rank *sends* (it receives as many), at the compute dtype, per layer:
  Ulysses all-to-all of q, k, v (k, v include the rank's reference-bank slice) and of the output,
  ``(u-1)/u`` of each leaving the rank; the ring all-gather of the Ulysses group's keys/values
  (padded to the longest group) to the ``r-1`` other ring ranks; once per call the all-gather of
  the video output over the sequence ranks and of the two CFG halves. Time = bytes / ``bandwidth``
  (one direction of one GPU's link).
- **step time** = compute + comm − ``overlap`` × min(compute, comm): ``overlap=0`` (the default) is
  no overlap, as the implementation does today (collectives run between the layer's kernels);
  ``1`` is perfect overlap.
- **speed-up** = single-GPU step time (all FLOPs at ``tflops``, no communication) / step time.

Launch latencies, kernel efficiency at smaller shards and load imbalance beyond the token counts are
not modelled; the figure is an upper bound for ``overlap=0`` on an idle link.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from hallo3_cli.parallel.degrees import Degrees, ParallelUsageError

#: Nominal one-direction bandwidth per GPU, bytes/s: NVLink 4 on H100/H200 SXM (900 GB/s both
#: directions); PCIe 4.0 x16 as achieved by peer copies (32 GB/s nominal).
INTERCONNECTS = {"nvlink": 450e9, "pcie": 25e9}
#: Dense bf16 throughput assumed for compute time (an H100 SXM's sustained rate, as in docs/model.md §9).
DEFAULT_TFLOPS = 800.0


@dataclass(frozen=True)
class ParallelCost:
    """One denoising step on ``degrees.world`` ranks (per rank), and the predicted speed-up."""

    cfg: int
    ulysses: int
    ring: int
    flops_per_rank: float
    flops_fraction: float
    comm_bytes_per_step: int
    kv_buffer_bytes: int  # gathered keys/values of one layer held at once by a rank
    compute_s: float
    comm_s: float
    step_s: float
    single_step_s: float
    predicted_speedup: float
    bandwidth_bytes_per_s: float
    tflops: float
    overlap: float

    def to_dict(self) -> dict:
        return asdict(self)


def _split(length: int, parts: int) -> list[int]:
    base, extra = divmod(length, parts)
    return [base + (i < extra) for i in range(parts)]


def parallel_cost(
    degrees: Degrees,
    *,
    flops_per_step: float,
    text_tokens: int = 226,
    video_tokens: int = 17550,
    ref_tokens: int = 1350,
    width: int = 3072,
    layers: int = 42,
    output_channels: int = 64,
    dtype_bytes: int = 2,
    tflops: float = DEFAULT_TFLOPS,
    bandwidth: str | float = "nvlink",
    overlap: float = 0.0,
) -> ParallelCost:
    """Cost of one batch-2 CFG denoiser call (``flops_per_step`` FLOPs on one GPU) split by ``degrees``.

    Sizes default to the production model (docs/model.md §2, §9): 226 text, 13·1350 video and 1350 reference
    tokens, width 3072, 42 layers, ``output_channels`` = patch² × 16. ``bandwidth``: a key of
    :data:`INTERCONNECTS` or bytes/s.
    """
    if isinstance(bandwidth, str):
        if bandwidth not in INTERCONNECTS:
            raise ParallelUsageError(f"interconnect must be one of {', '.join(INTERCONNECTS)} or a number, got {bandwidth!r}")
        bandwidth = INTERCONNECTS[bandwidth]
    if bandwidth <= 0 or tflops <= 0 or not 0 <= overlap <= 1:
        raise ParallelUsageError("bandwidth and TFLOP/s must be positive and overlap between 0 and 1")
    cfg, u, r = degrees.cfg, degrees.ulysses, degrees.ring
    parts = u * r
    batch = 2 // cfg  # CFG rows per rank
    queries = _split(text_tokens + video_tokens, parts)
    refs = _split(ref_tokens, parts)
    keys = [q + m for q, m in zip(queries, refs)]
    video = [max(0, s + q - text_tokens) - max(0, s - text_tokens)
             for s, q in zip([sum(queries[:i]) for i in range(parts)], queries)]
    n, k = max(queries), max(keys)

    fraction = n / (text_tokens + video_tokens) / cfg
    per_layer = 0.0
    if u > 1:
        per_layer += batch * (2 * n + 2 * k) * width * (u - 1) / u
    group_keys = max(sum(keys[i * u:(i + 1) * u]) for i in range(r))
    if r > 1:
        per_layer += batch * 2 * group_keys * (width // u) * (r - 1)
    once = batch * max(video) * output_channels * (parts - 1) + (cfg - 1) * batch * video_tokens * output_channels
    comm = int((layers * per_layer + once) * dtype_bytes)
    kv_buffer = int(batch * 2 * (text_tokens + video_tokens + ref_tokens) * (width // u) * dtype_bytes)

    single = flops_per_step / (tflops * 1e12)
    compute = single * fraction
    comm_s = comm / bandwidth
    step = compute + comm_s - overlap * min(compute, comm_s)
    return ParallelCost(
        cfg=cfg, ulysses=u, ring=r, flops_per_rank=flops_per_step * fraction, flops_fraction=fraction,
        comm_bytes_per_step=comm, kv_buffer_bytes=kv_buffer, compute_s=compute, comm_s=comm_s, step_s=step,
        single_step_s=single, predicted_speedup=single / step, bandwidth_bytes_per_s=float(bandwidth),
        tflops=tflops, overlap=overlap,
    )
