"""One denoiser call on many processes: CFG parallel × sequence parallel (Ulysses × ring), under torchrun.

Pieces and what carries them:

- **Degrees** (:mod:`.degrees`): ``cfg × ulysses × ring = N``, chosen from N and the head count, with
  overrides; impossible splits fail with a one-line usage error naming the valid ones.
- **Mesh** (:mod:`.mesh`): torchrun's environment, ``torch.distributed`` (gloo on CPU, nccl on CUDA)
  and a ``DeviceMesh`` with dims ``cfg × ring × ulysses``. No launcher, no process management.
- **CFG parallel** (:mod:`.engine`): a model pre-hook gives CFG rank ``c`` batch row ``c``; a post-hook
  all-gathers the two halves.
- **Sequence parallel** (:mod:`.engine`, :mod:`.processors`): each rank holds a contiguous, possibly
  uneven shard of the joint ``[text | video]`` tokens and of the reference bank (extra keys/values,
  docs/model.md §8b.6). Norms, adaLN and the MLP are per token and run on the shard as they are. RoPE rows
  are cut with the tokens; the per-frame face/audio cross-attention goes by each token's latent
  frame (a shard may straddle frames). Attention: Ulysses all-to-all over heads (``ulysses`` must
  divide the heads), then an all-gather of the keys/values over the ring ranks, then local attention
  through diffusers' ``dispatch_attention_fn`` (whichever backend ``set_attention_backend`` chose). The
  video tokens are all-gathered after ``proj_out``: every rank gets the full v-prediction, because
  every rank runs the sampler step.

- **Session** (:mod:`.session`): ``render --parallel video`` on top of the above: the split checked
  before anything loads, rank 0 computing the stage files and writing, the resume point and the motion
  frames agreed, and one failure message for all ranks (``hallo3_cli.jobs`` and the CLI use it).

Why our collectives rather than diffusers' context parallelism (``ContextParallelConfig`` /
``_cp_plan``, measured with diffusers 0.42.1 on CPU/gloo): ``enable_parallelism`` fails without an
accelerator (it takes ``rank % torch.accelerator.device_count()``, a modulo by zero); its ring
attention needs a backend that returns the log-sum-exp, which native SDPA does not; its
``ulysses_anything`` mode (token counts that do not divide, e.g. 226 + 17,550 by 3) needs uneven
all-gathers, which gloo refuses. Nor can a ``_cp_plan`` express the Hallo3 split: the shard is of
the concatenation of two inputs (text and video tokens enter the blocks separately), the reference
bank is keys without queries, and the cross-attention context depends on each token's frame.
Ours use only even all-gathers (padded) and uneven ``all_to_all_single``, which gloo and nccl both
support, so the code the CPU tests check is the code that runs on GPUs. Sharding the queries and
gathering all keys/values (the ring dimension) needs no log-sum-exp merge: it is plain attention
per rank, exact for any rank count.

Not yet: First Block Cache under parallelism (ranks would decide separately whether to skip
blocks; :func:`parallelize_transformer` refuses it), and ``torch.compile`` of the blocks with the
hooks installed is unmeasured.
"""

from hallo3_cli.parallel.cost import INTERCONNECTS, ParallelCost, parallel_cost
from hallo3_cli.parallel.degrees import Degrees, ParallelUsageError, choose_degrees, valid_degrees
from hallo3_cli.parallel.engine import (
    SequenceLayout,
    SequenceParallel,
    parallel_transformer,
    parallelize_transformer,
    split_cfg_inputs,
)
from hallo3_cli.parallel.mesh import ParallelConfig, init_parallel, setup_parallel, torchrun_env

__all__ = [
    "INTERCONNECTS", "Degrees", "ParallelConfig", "ParallelCost", "ParallelUsageError", "SequenceLayout",
    "SequenceParallel", "choose_degrees", "init_parallel", "parallel_cost", "parallel_transformer",
    "parallelize_transformer", "setup_parallel", "split_cfg_inputs", "torchrun_env", "valid_degrees",
]
