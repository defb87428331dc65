"""The release's sampler (docs/model.md §6) as a diffusers scheduler: zero-SNR DDPM timesteps + SDE-DPM-Solver++(2M).

    scheduler = Hallo3DPMSolverSDEScheduler()
    scheduler.set_timesteps(50)
    for t in scheduler.timesteps:
        v = guided_velocity(latents, t)                     # the CFG-combined v-prediction
        latents = scheduler.step(v, t, latents, generator=generator).prev_sample

The maths lives in :mod:`hallo3_cli.sampler` (plain functions, k-diffusion style); this class only
holds the state diffusers' scheduler protocol asks for (step index, the previous x0), so the exact
official numbers (``sampler_reference.json``, ``tiny_sample3``) come out of both.

diffusers' ``CogVideoXDPMScheduler`` is close but not this recipe (docs/model.md §6: up to 1e-2 apart over 50 toy
steps). Other diffusers schedulers with the usual ``step(model_output, timestep, sample)`` protocol can be
swapped in (``pipe.scheduler = DDIMScheduler(prediction_type="v_prediction", timestep_spacing="trailing",
rescale_betas_zero_snr=True, ...)``) to try fewer or other steps; that is not the release's recipe.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput

from hallo3_cli import sampler


@dataclass
class Hallo3SchedulerOutput(BaseOutput):
    """``prev_sample``: the state for the next step (after the last step: the final x0);
    ``pred_original_sample``: the x0 predicted at this step (float32)."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


class Hallo3DPMSolverSDEScheduler(SchedulerMixin, ConfigMixin):
    """SDE-DPM-Solver++(2M) on x0 with the release's zero-SNR schedule and denoiser alpha snapping.

    The model output is a v-prediction (already combined across the CFG halves). Step 0 is first order;
    from step 1 on every step draws two noise tensors and keeps the second (the official draw order);
    the last step returns x0. Noise comes from ``generator`` (drawn on the generator's device), or from
    ``variance_noise`` to replay recorded draws. The configuration is the release's; other values are
    refused rather than silently ignored.
    """

    order = 1
    _compatibles: list = []

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = sampler.NUM_TRAIN_TIMESTEPS,
        beta_start: float = sampler.BETA_START,
        beta_end: float = sampler.BETA_END,
        beta_schedule: str = "scaled_linear",
        prediction_type: str = "v_prediction",
        timestep_spacing: str = "trailing",
        rescale_betas_zero_snr: bool = True,
    ):
        release = (sampler.NUM_TRAIN_TIMESTEPS, sampler.BETA_START, sampler.BETA_END, "scaled_linear", "v_prediction",
                   "trailing", True)
        given = (num_train_timesteps, beta_start, beta_end, beta_schedule, prediction_type, timestep_spacing,
                 rescale_betas_zero_snr)
        if given != release:
            raise ValueError(f"{type(self).__name__} implements only the release's configuration {release}, got {given}")
        self.init_noise_sigma = 1.0
        self.num_inference_steps: int | None = None
        self.schedule: sampler.Schedule | None = None
        self.timesteps = torch.empty(0)
        self._step_index: int | None = None
        self._old_x0: torch.Tensor | None = None

    @property
    def step_index(self) -> int | None:
        return self._step_index

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Prepare ``num_inference_steps`` (1 … 1000) steps; ``timesteps`` are float32 network timesteps."""
        self.schedule = sampler.schedule(num_inference_steps)
        self.num_inference_steps = self.schedule.num_steps
        self.timesteps = self.schedule.timesteps.to(device) if device is not None else self.schedule.timesteps
        self._step_index = 0
        self._old_x0 = None

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample

    def denoiser_alpha(self, index: int | None = None) -> torch.Tensor:
        """The snapped sqrt(alpha_cumprod) used for c_skip/c_out at step ``index`` (default: the current one)."""
        return self.schedule.denoiser_alphas[self._step_index if index is None else index]

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        variance_noise: torch.Tensor | Sequence[torch.Tensor] | None = None,
        return_dict: bool = True,
    ) -> Hallo3SchedulerOutput | tuple:
        """Advance one step. ``variance_noise``: a tensor (used as this step's kept draw; the discarded
        draw is then not made) or a sequence of tensors consumed in draw order (as the official fixtures
        record them); otherwise noise is drawn from ``generator`` (``None``: the global torch RNG)."""
        if self.schedule is None:
            raise RuntimeError("call set_timesteps() before step()")
        i = self._step_index
        n = self.schedule.num_steps
        if i >= n:
            raise RuntimeError(f"all {n} steps have been taken; call set_timesteps() again")
        expected = float(self.schedule.timesteps[i])
        if float(timestep) != expected:
            raise ValueError(f"step {i} expects timestep {expected}, got {float(timestep)}")
        x = sample.to(torch.float32)
        x0 = sampler.v_to_x0(x, model_output, self.schedule.denoiser_alphas[i])
        if i == n - 1:
            prev = x0  # the last step returns the denoiser's x0 (docs/model.md §6)
        else:
            prev = sampler.dpm_solver_step(x, x0, self._old_x0, i, self.schedule, self._draw(generator, variance_noise, i))
        self._old_x0 = x0
        self._step_index = i + 1
        if not return_dict:
            return prev, x0
        return Hallo3SchedulerOutput(prev_sample=prev, pred_original_sample=x0)

    @staticmethod
    def _draw(generator, variance_noise, index: int):
        if isinstance(variance_noise, torch.Tensor):  # the kept draw only; the discarded one is skipped
            variance_noise = [variance_noise] if index == 0 else [None, variance_noise]
        if variance_noise is None:
            source = sampler._noise_fn(generator)
            return lambda like: sampler._checked(source, like)
        draws = iter(variance_noise)

        def replay(like):
            eps = next(draws, StopIteration)
            if eps is StopIteration:
                raise ValueError(f"variance_noise ran out at step {index}: it needs {1 if index == 0 else 2} tensors")
            return None if eps is None else sampler._checked(lambda _: eps, like)

        return replay

    # -- training (v-prediction on the full 1000-step zero-SNR table, docs/model.md §10.5) ------------------
    def _alphas_at(self, timesteps, like: torch.Tensor) -> torch.Tensor:
        """sqrt(alpha_cumprod) of the training table at integer ``timesteps``, shaped to broadcast over ``like``."""
        table = sampler.zero_snr_table()
        index = torch.as_tensor(timesteps, dtype=torch.long).reshape(-1).cpu()
        if bool(((index < 0) | (index >= len(table))).any()):
            raise ValueError(f"timesteps must be integers from 0 to {len(table) - 1}, got {index.tolist()}")
        alpha = table[index].to(like.device)
        return alpha.reshape(-1, *[1] * (like.ndim - 1))

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """``x_t = α·x0 + sqrt(1 − α²)·ε`` at integer ``timesteps`` (one per sample) of the training table, in
        float32 (the release's training forward process)."""
        alpha = self._alphas_at(timesteps, original_samples)
        sigma = (1 - alpha**2) ** 0.5
        return original_samples.float() * alpha + noise.float() * sigma

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """The v-prediction target ``v = α·ε − sqrt(1 − α²)·x0`` for clean ``sample`` x0 at ``timesteps``."""
        alpha = self._alphas_at(timesteps, sample)
        sigma = (1 - alpha**2) ** 0.5
        return noise.float() * alpha - sample.float() * sigma

    def __len__(self) -> int:
        return self.config.num_train_timesteps
