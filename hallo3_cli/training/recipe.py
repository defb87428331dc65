"""The release's training recipe as plain functions (docs/model.md §10.3–10.6): condition dropout rates, the
rank-stratified timesteps, the learning-rate schedule, the EMA decay and which parameters get weight decay.

The noise table itself (sqrt(alpha_cumprod) after the zero-SNR rescale of the full 1000-step table) is
:func:`hallo3_cli.sampler.zero_snr_table`, which the scheduler's ``add_noise``/``get_velocity`` read.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import numpy as np
import torch

from hallo3_cli.pipeline_hallo3 import MASK_RATE
from hallo3_cli.sampler import NUM_TRAIN_TIMESTEPS


@dataclass(frozen=True)
class Recipe:
    """The release's numbers (configs/sft_s{1,2}.yaml, cogvideox_5b_i2v_s{1,2}.yaml; docs/model.md §10.3–10.6)."""

    # condition dropout, each drawn independently per sample (§10.3); the face embedding is never dropped
    drop_text: float = 0.1
    drop_image: float = 0.05
    drop_reference: float = 0.05
    drop_audio: float = 0.05  # stage 2 only: the dataset zeroes the audio window
    # the image condition's motion frames (§10.3): Gaussian noise of σ = exp(N(mean, std)) per sample (None: no
    # noise), then one pixel mask of this rate shared by both frames and the batch (the rate inference masks with)
    motion_noise: tuple[float, float] | None = (-3.0, 0.5)
    motion_mask_rate: float = MASK_RATE
    # AdamW (sat FusedEmaAdam), no weight decay on LayerNorms and biases (§10.6)
    learning_rate: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 1e-4
    grad_clip: float = 0.1
    # schedule: warm-up over `warmup` of the run, linear decay; the finetune auto-warmup caps the first steps
    train_iters: int = 30_000
    warmup: float = 0.01
    auto_warmup_steps: int = 100
    auto_warmup_rate: float = 0.05
    ema_max_decay: float = 0.9999
    save_every: int = 500
    micro_batch: int = 1


RELEASE = Recipe()


# -- timesteps (§10.5) ---------------------------------------------------------------------------------------------

def timestep_band(rank: int, world_size: int, num_timesteps: int = NUM_TRAIN_TIMESTEPS) -> tuple[int, int]:
    """The inclusive range of timestep indices data-parallel ``rank`` of ``world_size`` draws from.

    The release splits the table into G equal bands, G = W / i for the smallest i that divides W with G dividing
    the table; consecutive groups of i ranks share a band (W = 8: rank r gets [125 r, 125 r + 124]; W = 1:
    [0, 999]; W = 3: all ranks [0, 999]). One process emulating W ranks uses ``timestep_band(micro_step % W, W)``.
    """
    rank, world_size, num_timesteps = map(operator.index, (rank, world_size, num_timesteps))
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank {rank} of {world_size}")
    width = next(i for i in range(1, world_size + 1) if world_size % i == 0 and num_timesteps % (world_size // i) == 0)
    interval = num_timesteps // (world_size // width)
    group = rank // width
    return group * interval, (group + 1) * interval - 1


def sample_timesteps(rank: int, world_size: int, n: int = 1, generator: torch.Generator | None = None,
                     num_timesteps: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """``n`` uniform timestep indices (int64) in this rank's band, drawn as the release draws them
    (``torch.randint(low, high + 1)``) from ``generator``."""
    low, high = timestep_band(rank, world_size, num_timesteps)
    return torch.randint(low, high + 1, (n,), generator=generator)


# -- learning rate (§10.6) -------------------------------------------------------------------------------------------

def learning_rate(step: int, recipe: Recipe = RELEASE) -> float:
    """The learning rate of optimizer step ``step`` (1-based: the n-th update uses ``learning_rate(n)``).

    sat's AnnealingLR in finetune mode: for the first ``auto_warmup_steps`` steps the warm-up value capped at
    ``lr · auto_warmup_rate``; linear warm-up to ``lr`` over ``warmup · train_iters`` steps; then linear decay
    ``lr · (train_iters − (n − warm-up)) / train_iters`` (1e-7 at step 30,000 of the release, never zero). Past
    ``train_iters`` the line continues, floored at 0.
    """
    step = operator.index(step)
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    lr = float(recipe.learning_rate)
    warmup = recipe.warmup * recipe.train_iters
    if warmup > 0 and step <= warmup:
        scheduled = lr * step / warmup
    else:
        scheduled = lr * ((recipe.train_iters - (step - warmup)) / recipe.train_iters)
    if step <= recipe.auto_warmup_steps:
        scheduled = min(lr * recipe.auto_warmup_rate, scheduled)
    return max(scheduled, 0.0)


def lr_lambda(recipe: Recipe = RELEASE):
    """A ``torch.optim.lr_scheduler.LambdaLR`` factor (optimizer lr = ``recipe.learning_rate``) giving the release's
    schedule in the usual loop ``optimizer.step(); scheduler.step()``: LambdaLR asks for index k before update
    k + 1, so the factor is ``learning_rate(k + 1) / lr``."""
    base = float(recipe.learning_rate)

    def factor(k: int) -> float:
        return learning_rate(k + 1, recipe) / base

    return factor


# -- EMA (§10.6) -----------------------------------------------------------------------------------------------------

def ema_decay(step: int, recipe: Recipe = RELEASE) -> float:
    """The EMA decay applied after update ``step`` (1-based): ``min(0.9999, (1 + n) / (10 + n))``;
    ``shadow = decay · shadow + (1 − decay) · new`` (sat FusedEmaAdam)."""
    step = operator.index(step)
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return min(recipe.ema_max_decay, (1 + step) / (10 + step))


def ema_decay_float32(step: int, recipe: Recipe = RELEASE) -> float:
    """:func:`ema_decay` rounded to float32, as the release's fused kernel takes it (``const float``)."""
    return float(np.float32(ema_decay(step, recipe)))


# -- weight decay (§10.6) --------------------------------------------------------------------------------------------

_NORMS = (torch.nn.LayerNorm, torch.nn.RMSNorm, torch.nn.GroupNorm)


def decays(module: torch.nn.Module, parameter_name: str) -> bool:
    """Whether parameter ``parameter_name`` held directly by ``module`` gets weight decay: not a normalisation
    layer's parameters, not biases (sat's rule: the module's type, then the parameter's own name)."""
    return not isinstance(module, _NORMS) and parameter_name != "bias"


def weight_decay_groups(models: dict[str, torch.nn.Module], weight_decay: float = RELEASE.weight_decay) -> list[dict]:
    """Optimizer parameter groups over the parameters that require grad in ``models`` (label → module):
    ``[{"params", "names", "weight_decay": weight_decay}, {"params", "names", "weight_decay": 0.0}]``, names as
    ``label.parameter`` (e.g. ``{"transformer": t, "reference_net": r}`` gives the names of
    :func:`~hallo3_cli.training.trainable_parameters`). Empty groups are left out."""
    groups = {True: {"params": [], "names": [], "weight_decay": float(weight_decay)},
              False: {"params": [], "names": [], "weight_decay": 0.0}}
    seen = set()
    for label, model in models.items():
        for module_name, module in model.named_modules():
            for name, parameter in module.named_parameters(recurse=False):
                if not parameter.requires_grad or id(parameter) in seen:
                    continue
                seen.add(id(parameter))
                group = groups[decays(module, name)]
                group["params"].append(parameter)
                group["names"].append(".".join(part for part in (label, module_name, name) if part))
    return [group for group in groups.values() if group["params"]]
