"""The conditions of one training step, built from a batch of :class:`~hallo3_cli.training.Hallo3Dataset` samples
as the release builds them (docs/model.md §10.3, §10.5)::

    inputs = step_inputs(batch, vae, stage=1, generator=g, rank=0, world_size=1, micro_step=k)
    loss = training_loss(transformer, reference_net, stage=1, **inputs)

Every random draw comes from ``generator`` (a CPU ``torch.Generator``), in this order: the motion frames' pixel
mask, the log-σ and the Gaussian noise of the motion frames, the VAE posterior samples of the image condition, the
masked reference and the clip, the diffusion noise ε, the timesteps, then the condition dropout (text, image,
reference). The same generator state gives bitwise the same inputs. The image condition draws first and as the
pipeline does (:meth:`~hallo3_cli.pipeline_hallo3.Hallo3Pipeline.prepare_condition`: the mask, then the posterior
sample), so with the motion noise off both encode the same frames to the same latent.

Decisions (docs/training.md):

- Condition dropout is drawn per sample. The release draws the text's per sample and the image condition's and
  reference's once per micro-batch, which is one sample per GPU in its recipe: per sample is the same draw for
  micro-batch 1 and gives a micro-batch of B the independent draws of B GPUs.
- Audio dropout is the dataset's (``Hallo3Dataset(audio_drop_rate=...)``, as the release draws it in its dataset,
  DV:802-803): the window is already zeros and ``drop_audio`` reports the dataset's draw (``audio_dropped``);
  nothing here zeroes or draws it again.
- The motion noise (σ = exp(N(−3, 0.5)) per sample) is drawn in float32 and added to the float32 frames before
  they are cast to the VAE's dtype (the release's bf16 engine draws it in bf16). ε is drawn in the latents' dtype
  (the VAE's), as the release's ``randn_like`` of its bf16 latents.
"""

from __future__ import annotations

import operator

import torch

from hallo3_cli.pipeline_hallo3 import motion_mask, vae_latents
from hallo3_cli.training.recipe import RELEASE, Recipe, sample_timesteps

#: The keys of a collated batch :func:`step_inputs` reads (stage 2 also ``audio`` and ``audio_dropped``).
BATCH_KEYS = ("frames", "ref_image", "masked_ref", "face_embedding", "prompt_embeds")
MOTION_FRAMES = 2  # the clip's first two frames follow the reference in the image condition (§10.3)


def _check_batch(batch: dict, stage: int) -> int:
    needed = BATCH_KEYS + (("audio", "audio_dropped") if stage == 2 else ())
    missing = [key for key in needed if key not in batch]
    if missing:
        raise ValueError(f"batch has no {', '.join(missing)} (a collated Hallo3Dataset batch of stage {stage})")
    frames = batch["frames"]
    if frames.ndim != 5 or frames.shape[2] != 3 or frames.shape[1] <= MOTION_FRAMES:
        raise ValueError(f"batch frames must be (B, frames, 3, H, W), got {tuple(frames.shape)}")
    size = frames.shape[0]
    for key in needed[1:]:
        if batch[key].shape[0] != size:
            raise ValueError(f"batch {key} holds {batch[key].shape[0]} samples, frames {size}")
    for key in ("ref_image", "masked_ref"):
        if batch[key].shape[1:] != frames.shape[2:]:
            raise ValueError(f"batch {key} {tuple(batch[key].shape)} does not fit frames {tuple(frames.shape)}")
    return size


def _draw_drops(size: int, rate: float, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(size, generator=generator) < rate


def condition_frames(frames: torch.Tensor, ref_image: torch.Tensor, generator: torch.Generator,
                     recipe: Recipe = RELEASE) -> torch.Tensor:
    """The pixels the image condition encodes (docs/model.md §10.3 item 2): ``[ref_image, m(n(f0)), m(n(f1))]``
    float32 ``(B, 3, 3, H, W)``, f0/f1 the first two of ``frames`` (B, F, 3, H, W). ``n`` adds N(0, σ²) noise
    with σ = exp(N(μ, s)) drawn per sample (``recipe.motion_noise`` = (μ, s); None: no noise), ``m`` zeroes the
    pixels of one mask of rate ``recipe.motion_mask_rate`` (0: no mask, no draw) shared by both frames and the
    batch (the release's mask; :func:`~hallo3_cli.pipeline_hallo3.motion_mask`, as inference masks). Draws, in
    order: the mask, the B log-σ, the noise."""
    frames, ref_image = frames.float(), ref_image.float()
    size, (height, width) = frames.shape[0], frames.shape[-2:]
    rate = recipe.motion_mask_rate
    keep = motion_mask(height, width, generator, rate).to(frames.device) if rate > 0 else None
    motion = frames[:, :MOTION_FRAMES]
    if recipe.motion_noise is not None:
        mean, std = recipe.motion_noise
        sigma = torch.exp(torch.normal(mean, std, (size,), generator=generator)).to(frames.device)
        motion = motion + torch.randn(motion.shape, generator=generator).to(frames.device) * sigma.reshape(-1, 1, 1, 1, 1)
    if keep is not None:
        motion = motion * keep
    return torch.cat([ref_image[:, None], motion], dim=1)


@torch.no_grad()
def step_inputs(batch: dict, vae, *, stage: int, recipe: Recipe = RELEASE, generator: torch.Generator, rank: int = 0,
                world_size: int = 1, micro_step: int = 0, drops: bool = True) -> dict:
    """A collated :class:`~hallo3_cli.training.Hallo3Dataset` batch (B samples) → the keyword arguments of
    :func:`~hallo3_cli.training.training_loss` (all but the networks and the stage), docs/model.md §10.3:

    - ``latents`` (B, 13, 16, h, w): the VAE posterior sample ×``vae.config.scaling_factor`` of the 49 frames;
    - ``image_condition`` (B, 1, 16, h, w): the latent of ``[ref_image, m(n(f0)), m(n(f1))]``, f0/f1 the clip's
      first two frames, ``n`` Gaussian noise of σ = exp(N(μ, s)) per sample (``recipe.motion_noise``; None: off),
      ``m`` one pixel mask of rate ``recipe.motion_mask_rate`` shared by both frames and the whole batch;
    - ``ref_latent`` (B, 1, 16, h, w): the latent of ``masked_ref``;
    - ``noise`` ε ~ N(0, 1), the latents' shape and dtype; ``timestep`` (B,) int64, uniform in the band of
      data-parallel slot ``(rank + micro_step) % world_size`` of ``world_size``
      (:func:`~hallo3_cli.training.timestep_band`; the release's rank-stratified draw): W processes pass their
      rank and ``micro_step=0``, one process standing for W ranks passes ``rank=0`` and its micro-step count, P
      processes accumulating A micro-steps each pass ``rank=r·A``, ``world_size=P·A``;
    - ``prompt_embeds``, ``face_embeds``, ``audio`` (stage 2; None in stage 1) from the batch, on the VAE's device;
    - ``drop_text``, ``drop_image``, ``drop_reference``: (B,) bool, drawn with the recipe's rates (all False when
      ``drops`` is False); ``drop_audio``: the dataset's ``audio_dropped`` in stage 2 (its window is already zeros),
      False in stage 1.

    The VAE runs in its own dtype on its own device, under ``no_grad``. ``generator``: every random draw (see the
    module docstring for their order); a trainer that wants runs to be reproducible seeds it per step and slot.
    """
    if stage not in (1, 2):
        raise ValueError(f"stage must be 1 or 2, got {stage!r}")
    rank, world_size, micro_step = map(operator.index, (rank, world_size, micro_step))
    if world_size < 1 or rank < 0 or micro_step < 0:
        raise ValueError(f"need rank >= 0, micro_step >= 0, world_size >= 1; got {rank}, {micro_step}, {world_size}")
    if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
        raise TypeError(f"generator must be a CPU torch.Generator (the same draws on every device), got {generator!r}")
    size = _check_batch(batch, stage)
    device, scale = vae.device, float(vae.config.scaling_factor)
    frames = batch["frames"].float()

    # image condition: [reference, m(n(f0)), m(n(f1))] → one latent frame (§10.3 item 2; DE:174-194)
    image_condition = vae_latents(vae, condition_frames(frames, batch["ref_image"], generator, recipe), generator,
                                  scale, device)
    ref_latent = vae_latents(vae, batch["masked_ref"].float()[:, None], generator, scale, device)
    latents = vae_latents(vae, frames, generator, scale, device)

    noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype).to(device)
    slot = (rank + micro_step) % world_size
    timestep = sample_timesteps(slot, world_size, size, generator).to(device)
    if drops:
        drop_text = _draw_drops(size, recipe.drop_text, generator)
        drop_image = _draw_drops(size, recipe.drop_image, generator)
        drop_reference = _draw_drops(size, recipe.drop_reference, generator)
    else:
        drop_text = drop_image = drop_reference = torch.zeros(size, dtype=torch.bool)
    audio = drop_audio = None
    if stage == 2:
        audio = batch["audio"].to(device)
        drop_audio = torch.as_tensor(batch["audio_dropped"], dtype=torch.bool).reshape(size)
    return {
        "latents": latents, "noise": noise, "timestep": timestep, "image_condition": image_condition,
        "ref_latent": ref_latent, "prompt_embeds": batch["prompt_embeds"].to(device),
        "face_embeds": batch["face_embedding"].to(device), "audio": audio,
        "drop_text": drop_text.to(device), "drop_image": drop_image.to(device),
        "drop_reference": drop_reference.to(device),
        "drop_audio": (drop_audio if drop_audio is not None else torch.zeros(size, dtype=torch.bool)).to(device),
    }
