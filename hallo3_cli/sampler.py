"""The exact Hallo3 sampler (docs/model.md §6): zero-SNR DDPM discretisation + SDE-DPM-Solver++(2M) on x0.

Plain functions, k-diffusion style::

    sched = schedule(50)
    x = initial_noise((1, 13, 16, 60, 90), generator)
    latent = sample(denoise, x, sched, noise=generator)

``denoise(x, t, alpha)`` is supplied by the caller: it runs the CFG batch through the DiT at network
timestep ``t`` and returns the guided x0, typically
``cfg(v_to_x0(x, v_uncond, alpha), v_to_x0(x, v_cond, alpha), scale)``.

All scalar arithmetic mirrors the official code's dtypes (float64 for the beta schedule, float32 from
the square root on), which reproduces the official run bit for bit.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Union

import numpy as np
import torch

NUM_TRAIN_TIMESTEPS = 1000
BETA_START = 0.00085
BETA_END = 0.012

Denoise = Callable[[torch.Tensor, float, torch.Tensor], torch.Tensor]
NoiseSource = Union[None, torch.Generator, Callable[[torch.Tensor], torch.Tensor], Iterable[torch.Tensor]]


@dataclass(frozen=True)
class Schedule:
    """Everything the sampler needs for one step count (all CPU tensors).

    ``timesteps``         (n,) float32, network timesteps, descending (999, 979, …, 19 for 50 steps).
    ``alphas``            (n + 1,) float32, the sampler's sqrt(alpha_cumprod) per step, ascending from 0,
                          with 1.0 appended; drives the DPM-Solver multipliers.
    ``denoiser_indices``  (n,) int64, index of ``alphas[i]`` snapped onto ``table``.
    ``denoiser_alphas``   (n,) float32, ``table[denoiser_indices]``: the alpha used for c_skip/c_out.
    ``table``             (1000,) float32, the full zero-SNR sqrt(alpha_cumprod) table indexed by t.
    """

    timesteps: torch.Tensor
    alphas: torch.Tensor
    denoiser_indices: torch.Tensor
    denoiser_alphas: torch.Tensor
    table: torch.Tensor = field(repr=False)

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])


def alphas_cumprod() -> np.ndarray:
    """The training schedule's cumulative alpha products, float64 (scaled-linear betas)."""
    return _alphas_cumprod().copy()


@functools.lru_cache(maxsize=1)
def _alphas_cumprod() -> np.ndarray:
    # computed once: the training plan then reads it while tracing on fake tensors (which have no .numpy())
    betas = torch.linspace(BETA_START**0.5, BETA_END**0.5, NUM_TRAIN_TIMESTEPS, dtype=torch.float64) ** 2
    products = np.cumprod(1.0 - betas.numpy())
    products.flags.writeable = False
    return products


def _zero_snr_sqrt(alphas_cumprod_ascending_t: np.ndarray, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """sqrt(alpha_cumprod), shifted/rescaled so the last entry is 0 and the first is kept. In float32 as the
    official code computes it (torch's float32 ``sqrt`` is not correctly rounded on every CPU, so the last bit
    of an entry can differ between machines), or in float64 (the exact maths, for decisions)."""
    s = torch.tensor(alphas_cumprod_ascending_t, dtype=dtype).sqrt()
    first, last = s[0].clone(), s[-1].clone()
    return (s - last) * (first / (first - last))


def zero_snr_table(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The denoiser's 1000-entry zero-SNR table of sqrt(alpha_cumprod), indexed by timestep."""
    return _zero_snr_sqrt(alphas_cumprod(), dtype)


def network_timesteps(num_steps: int) -> np.ndarray:
    """Integer network timesteps, descending: ``linspace(999, 0, n, endpoint=False)`` truncated."""
    return np.linspace(NUM_TRAIN_TIMESTEPS - 1, 0, num_steps, endpoint=False).astype(np.int64)


def snap_to_table(alpha: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Indices of the nearest table entries (argmin of |difference|, first on ties)."""
    alpha = torch.as_tensor(alpha, dtype=table.dtype).reshape(-1)
    return (alpha - table[:, None]).abs().argmin(dim=0)


def _sampler_alphas(steps: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    if len(steps) == 1:
        # The subsample rescale is 0/0 for one step (the official code yields NaN); its only
        # meaningful value is the zero-SNR endpoint.
        return torch.zeros(1, dtype=dtype)
    # docs/model.md §6: zero-SNR rescale on the subsample itself, anchored at its smallest timestep.
    return _zero_snr_sqrt(alphas_cumprod()[steps[::-1].copy()], dtype).flip(0)


def schedule(num_steps: int) -> Schedule:
    """The sampling schedule for ``num_steps`` (1 … 1000) steps.

    The values are the official float32 ones. Which table entry each step snaps to is decided on the exact
    (float64) values: the nearest entry is always hundreds of float32 ulps nearer than the next one, so the
    decision is the official one and cannot flip with the last bit of a float32 ``sqrt`` on another CPU.
    """
    num_steps = operator.index(num_steps)
    if not 1 <= num_steps <= NUM_TRAIN_TIMESTEPS:
        raise ValueError(f"num_steps must be between 1 and {NUM_TRAIN_TIMESTEPS}, got {num_steps}")

    table = zero_snr_table()
    steps = network_timesteps(num_steps)
    sampler = _sampler_alphas(steps, torch.float32)
    alphas = torch.cat([sampler, torch.ones(1, dtype=torch.float32)])
    indices = snap_to_table(_sampler_alphas(steps, torch.float64), zero_snr_table(torch.float64))
    return Schedule(
        timesteps=torch.from_numpy(steps).to(torch.float32),
        alphas=alphas,
        denoiser_indices=indices,
        denoiser_alphas=table[indices],
        table=table,
    )


def noise_draws(num_steps: int) -> int:
    """How many noise tensors :func:`sample` draws for ``num_steps`` steps."""
    return 0 if num_steps < 2 else 1 + 2 * (num_steps - 2)


def denoiser_scalings(alpha: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(c_skip, c_out)`` for v-prediction at ``alpha`` (float32, shape ``(1,)``)."""
    a = torch.as_tensor(alpha, dtype=torch.float32, device="cpu").reshape(1)
    return a, -((1 - a**2) ** 0.5)


def v_to_x0(x: torch.Tensor, v: torch.Tensor, alpha: float | torch.Tensor) -> torch.Tensor:
    """x0 from the network's v-prediction: ``alpha·x - sqrt(1 - alpha²)·v``, in float32.

    ``alpha`` is the snapped denoiser alpha (``Schedule.denoiser_alphas[i]``).
    """
    c_skip, c_out = (c.to(x.device).reshape([1] * x.ndim) for c in denoiser_scalings(alpha))
    return v.to(torch.float32) * c_out + x.to(torch.float32) * c_skip


def cfg(x0_uncond: torch.Tensor, x0_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance on x0 (docs/model.md §6: constant scale 3.5 in the release)."""
    return x0_uncond + scale * (x0_cond - x0_uncond)


def initial_noise(
    shape: tuple[int, ...] | torch.Size,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Standard normal float32 noise, not scaled (the zero-SNR start is pure noise).

    Drawn on the generator's device (CPU for ``None``) and moved to ``device``.
    """
    draw_device = generator.device if generator is not None else "cpu"
    noise = torch.randn(tuple(shape), generator=generator, device=draw_device, dtype=torch.float32)
    return noise if device is None else noise.to(device)


def _noise_fn(noise: NoiseSource) -> Callable[[torch.Tensor], torch.Tensor]:
    if noise is None:  # the global torch RNG, as the official code
        return torch.randn_like
    if isinstance(noise, torch.Generator):
        generator = noise

        def draw(x: torch.Tensor) -> torch.Tensor:
            out = torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype)
            return out.to(x.device)

        return draw
    if callable(noise):
        return noise
    iterator: Iterator[torch.Tensor] = iter(noise)

    def take(x: torch.Tensor) -> torch.Tensor:
        try:
            return next(iterator)
        except StopIteration:
            message = "the noise sequence ran out: sample() needs noise_draws(num_steps) tensors"
            raise ValueError(message) from None

    return take


def _checked(draw: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    eps = draw(x)
    if eps.shape != x.shape:
        raise ValueError(f"noise tensor has shape {tuple(eps.shape)}, expected {tuple(x.shape)}")
    return eps.to(device=x.device, dtype=torch.float32)


def _log_snr(alpha: torch.Tensor) -> torch.Tensor:
    alpha_cumprod = alpha**2
    return ((alpha_cumprod / (1 - alpha_cumprod)) ** 0.5).log()


def dpm_solver_step(
    x: torch.Tensor,
    x0: torch.Tensor,
    old_x0: torch.Tensor | None,
    i: int,
    schedule: Schedule,
    draw: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """One SDE-DPM-Solver++(2M) update from step ``i`` to ``i + 1`` (``i < num_steps - 1``), float32.

    ``x0`` is the (guided) denoiser output at step ``i``, ``old_x0`` the previous step's (None at step 0:
    first order). ``draw(like)`` returns one standard-normal tensor shaped like ``x``: step 0 draws one,
    later steps two, the first discarded (see :func:`noise_draws`).
    """
    alphas = schedule.alphas
    # Float32 (1,)-shaped scalars as in the official code. Step 0 has alpha = 0: log 0 = -inf gives
    # h = inf, so the x multiplier is exactly 0 and the step 1 second-order term vanishes (docs/model.md §6).
    a, a_next = alphas[i].reshape(1), alphas[i + 1].reshape(1)
    lam, lam_next = _log_snr(a), _log_snr(a_next)
    h = lam_next - lam
    shape = [1] * x.ndim
    mult_x = (((1 - a_next**2) / (1 - a**2)) ** 0.5 * (-h).exp()).to(x.device).reshape(shape)
    mult_x0 = ((-2 * h).expm1() * a_next).to(x.device).reshape(shape)
    mult_noise = ((1 - a_next**2) ** 0.5 * (1 - (-2 * h).exp()) ** 0.5).to(x.device).reshape(shape)

    if old_x0 is None:
        return mult_x * x - mult_x0 * x0 + mult_noise * draw(x)
    r = (lam - _log_snr(alphas[i - 1].reshape(1))) / h
    mult_cur = (1 + 1 / (2 * r)).to(x.device).reshape(shape)
    mult_old = (1 / (2 * r)).to(x.device).reshape(shape)
    # The official code also builds a first-order candidate and throws it away; its noise
    # draw is kept so that a generator stream matches the official draw order (docs/model.md §6).
    draw(x)
    x0_2m = mult_cur * x0 - mult_old * old_x0
    return mult_x * x - mult_x0 * x0_2m + mult_noise * draw(x)


def sample(
    denoise: Denoise,
    x: torch.Tensor,
    schedule: Schedule,
    noise: NoiseSource = None,
    callback: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Run SDE-DPM-Solver++(2M) from the initial noise ``x`` and return the final x0 (float32).

    ``denoise(x, t, alpha)`` returns the guided x0 for the float32 state ``x`` at network timestep ``t``
    (a float) using ``alpha`` (0-d float32 tensor) for c_skip/c_out. ``noise`` is the source of the
    step noise: ``None`` (global torch RNG), a ``torch.Generator``, a callable ``f(x) -> tensor like x``,
    or an iterable of tensors consumed in draw order. Step 0 draws one tensor, every later step but
    the last draws two and uses the second (see :func:`noise_draws`). ``callback(i, num_steps)`` is
    called after each step ``i`` (0-based).
    """
    n = schedule.num_steps
    if n < 1:
        raise ValueError("the schedule has no steps")
    draw = _noise_fn(noise)
    x = x.to(torch.float32)
    old_x0 = None
    for i in range(n - 1):
        x0 = denoise(x, float(schedule.timesteps[i]), schedule.denoiser_alphas[i]).to(torch.float32)
        x = dpm_solver_step(x, x0, old_x0, i, schedule, lambda like: _checked(draw, like))
        old_x0 = x0
        if callback is not None:
            callback(i, n)

    # The last step returns the denoiser's x0 directly.
    x0 = denoise(x, float(schedule.timesteps[n - 1]), schedule.denoiser_alphas[n - 1]).to(torch.float32)
    if callback is not None:
        callback(n - 1, n)
    return x0
