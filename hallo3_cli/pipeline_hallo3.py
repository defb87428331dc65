"""``Hallo3Pipeline``: one portrait + one speech recording → a talking video of any length (diffusers).

    import torch
    from hallo3_cli import Hallo3Pipeline

    pipe = Hallo3Pipeline.from_pretrained("tiny-random")           # a preset of models.toml, or a folder
    out = pipe(image="face.jpg", audio="speech.wav", seed=7, output_type="np")
    out.frames    # uint8 (num_frames, H, W, 3), trimmed to the speech, square portraits back to square
    out.latents   # (num_clips, 13, 16, h, w)

A plain diffusers pipeline: it knows its components, nothing of presets, runtimes or how its networks were
loaded and placed (that is :mod:`hallo3_cli.loading`). The named steps are the stages of the CLI
(``hallo3 embed-audio``, ``encode-ref``, ``render``, ``stitch``), which run them through :mod:`hallo3_cli.jobs`:
:meth:`~Hallo3Pipeline.encode_audio`, :meth:`~Hallo3Pipeline.encode_reference` (face analysis, VAE latent,
:meth:`~Hallo3Pipeline.encode_prompt`, the reference network's bank), :meth:`~Hallo3Pipeline.prepare_context`,
then per clip :meth:`~Hallo3Pipeline.prepare_condition` → :meth:`~Hallo3Pipeline.denoise` (every step one
:meth:`~Hallo3Pipeline.guided_velocity` call: the CFG batch through :meth:`~Hallo3Pipeline.velocity`) →
:meth:`~Hallo3Pipeline.decode_latents`, chained by :meth:`~Hallo3Pipeline.generate_clips` (docs/model.md §7)
and ``__call__``.

Randomness (docs/model.md §7, "Randomness"): each clip draws everything (motion-frame pixel mask, VAE posterior
sample, initial noise, sampler noise) from its own CPU generator seeded from ``(seed, clip index)``, in the
official order. A clip depends only on the inputs, the settings and the previous clip's motion frames, so a
render can resume from persisted clips with identical frames.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.loaders import CogVideoXLoraLoaderMixin
from diffusers.utils import BaseOutput

from hallo3_cli import geometry, options, sampler
from hallo3_cli.components import FACE_FOLDER
from hallo3_cli.conditioning import DiTConditions, dit_velocity, reference_bank
from hallo3_cli.errors import ArgumentError, Hallo3Error, NonFiniteError

log = logging.getLogger("hallo3")

MASK_RATE = 0.1  # share of motion-frame pixels zeroed (docs/model.md §7.3)
REFERENCE_SEED = 0  # the VAE posterior sample of the reference latent (the official code samples too)
AUDIO_WINDOW = 5  # frames of audio context per video frame (docs/model.md §5.5)
OUTPUT_TYPES = ("np", "pil", "pt", "latent")
_FROM_FOLDER = object()  # from_pretrained's default face analyzer: the folder's face_analysis/, if any


# ---------------------------------------------------------------------------------------------
# the video loop's pieces (docs/model.md §7)


def clip_generator(seed: int, index: int) -> torch.Generator:
    """The CPU generator of clip ``index`` (same stream on every device)."""
    digest = hashlib.sha256(f"hallo3:{seed}:{index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def clip_audio(features: torch.Tensor, index: int, clip_length: int, motion_frames: int, window: int = AUDIO_WINDOW) -> torch.Tensor:
    """Windowed audio of clip ``index``: ``(clip_length, window, layers, channels)`` (docs/model.md §7.4).

    A 2-frame prefix (zeros for clip 0, else the two frames before the clip's new frames), the
    clip's new frames, then the last frame repeated up to ``clip_length``.
    """
    from hallo3_cli.audio import window_features

    new = clip_length - motion_frames
    start = index * new
    stop = min(start + new, features.shape[0])
    body = window_features(features, start, stop, window)
    if index == 0:
        prefix = torch.zeros_like(body[:1]).expand(motion_frames, *body.shape[1:])
    else:
        prefix = window_features(features, start - motion_frames, start, window)
    audio = torch.cat([prefix, body])
    if audio.shape[0] < clip_length:
        audio = torch.cat([audio, audio[-1:].expand(clip_length - audio.shape[0], *audio.shape[1:])])
    return audio


def motion_mask(height: int, width: int, generator: torch.Generator, rate: float = MASK_RATE) -> torch.Tensor:
    """The one random pixel mask both motion frames share (docs/model.md §7.3, §10.3): float32 ``(H, W)``, 0 on
    the pixels drawn (each with probability ``rate``), else 1; one ``rand`` of ``generator``."""
    return (torch.rand(height, width, generator=generator) > rate).float()


def vae_latents(vae, frames: torch.Tensor, generator: torch.Generator, scale: float,
                device: torch.device | str | None = None) -> torch.Tensor:
    """Frames ``(B, F, 3, H, W)`` in [-1, 1] → the VAE posterior SAMPLE ×``scale``, ``(B, f, 16, h, w)`` in the
    VAE's dtype (the causal VAE maps 1 + 4k frames to 1 + k latent frames), drawn from ``generator``. ``device``:
    where the VAE runs (default: its parameters' device)."""
    device = vae.device if device is None else device
    posterior = vae.encode(frames.permute(0, 2, 1, 3, 4).to(device, vae.dtype)).latent_dist
    return (posterior.sample(generator=generator) * scale).permute(0, 2, 1, 3, 4)


# ---------------------------------------------------------------------------------------------
# what the stages produce


@dataclass
class Hallo3Audio:
    """Speech features: ``features`` (frames padded to whole clips, layers, channels) float32 CPU, not
    windowed; ``num_frames`` video frames of the speech itself."""

    features: torch.Tensor
    num_frames: int


@dataclass
class Hallo3Portrait:
    """A portrait framed for the model, before any network (:meth:`Hallo3Pipeline.frame_portrait`).

    ``image`` (3, H, W) framed, in [-1, 1]; ``masked`` the same with everything outside the face mask black
    (what the reference latent encodes); ``mask`` (H, W) bool, inside the face mask; ``face_box`` (4,) int32
    in the frame; ``face`` the detector's result on the source; ``framing`` ``pad`` or ``crop``."""

    image: torch.Tensor
    masked: torch.Tensor
    mask: torch.Tensor
    face_box: torch.Tensor
    face: Any
    framing: str
    source_width: int
    source_height: int


@dataclass
class Hallo3Reference:
    """The identity of one portrait (= the tensors and metadata of a reference stage file).

    ``image`` (3, H, W) framed, in [-1, 1]; ``ref_latent`` (16, h, w) VAE latent of the face-masked image
    ×scale; ``face_embedding`` (512,); ``face_box`` (4,) int32 in the framed image; ``prompt_embeds``
    (text tokens, width); ``ref_bank`` (layers, tokens, width); ``framing`` ``pad`` (square source) or ``crop``.
    """

    image: torch.Tensor
    ref_latent: torch.Tensor
    face_embedding: torch.Tensor
    face_box: torch.Tensor
    prompt_embeds: torch.Tensor
    ref_bank: torch.Tensor
    framing: str
    source_width: int
    source_height: int
    face_found: bool
    prompt: str
    mask: torch.Tensor | None = None  # (H, W) bool, inside the face mask (for previews)

    TENSORS = ("image", "ref_latent", "face_embedding", "face_box", "prompt_embeds", "ref_bank")


@dataclass
class Hallo3Clip:
    """A finished clip: its latents ``(latent_frames, 16, h, w)`` and (when decoded) its frames in
    [-1, 1] ``(clip_length, 3, H, W)``."""

    index: int
    num_clips: int
    latents: torch.Tensor
    frames: torch.Tensor | None


@dataclass
class Hallo3PipelineOutput(BaseOutput):
    """``frames``: the video (``np``: uint8 (num_frames, H, W, 3); ``pil``: list of images; ``pt``: float
    (num_frames, 3, H, W) in [0, 1]; ``latent``: None), trimmed to the speech and cropped back to a square
    for square portraits. ``latents``: every clip's latents ``(num_clips, latent_frames, 16, h, w)``."""

    frames: Any
    latents: torch.Tensor
    fps: int


# ---------------------------------------------------------------------------------------------


@dataclass
class Hallo3Context:
    """What every clip of a render shares, on the device (:meth:`Hallo3Pipeline.prepare_context`): the CFG pairs
    ``[unconditional, conditional]`` of the text embedding ``(2, L, D)`` and of the face tokens, the
    unconditional audio tokens (projected once per render) and the reference bank (one ``(1, N, D)`` per layer)."""

    text: torch.Tensor
    face_tokens: torch.Tensor
    uncond_audio_tokens: torch.Tensor
    bank: list[torch.Tensor]


class Hallo3Pipeline(DiffusionPipeline, CogVideoXLoraLoaderMixin):
    r"""Hallo3 (CVPR 2025) audio-driven portrait animation on diffusers' CogVideoX.

    Components: ``transformer`` (:class:`~hallo3_cli.models.Hallo3Transformer3DModel`), ``reference_net``
    (:class:`~hallo3_cli.models.Hallo3ReferenceNet`), ``vae`` (``AutoencoderKLCogVideoX``), ``text_encoder``
    + ``tokenizer`` (T5), ``audio_encoder`` (``Wav2Vec2Model``) + ``feature_extractor``, ``scheduler``
    (:class:`~hallo3_cli.scheduling_hallo3.Hallo3DPMSolverSDEScheduler` = the release's sampler), and the
    optional, non-module ``face_analyzer`` (SCRFD + ArcFace on onnxruntime; None: no face detection, a zero
    face embedding and the whole image as the face region). LoRA adapters of the main DiT load with
    ``load_lora_weights`` (diffusers' format).

    Each step uses the components it needs and fails with a clear error when one is missing, so a pipeline
    may hold only some of them (the jobs load each network when its stage runs).
    """

    model_cpu_offload_seq = "audio_encoder->text_encoder->reference_net->transformer->vae"  # the order a render runs them
    _optional_components = ["reference_net", "text_encoder", "tokenizer", "audio_encoder", "feature_extractor"]
    _callback_tensor_inputs = ["latents"]
    _lora_loadable_modules = ["transformer"]
    transformer_name = "transformer"
    #: Builds the pipeline of a name that is not a folder (a model preset of ``models.toml``): set by
    #: :mod:`hallo3_cli.loading`, which ``hallo3_cli.Hallo3Pipeline`` imports first.
    name_loader: ClassVar[Callable[..., Hallo3Pipeline] | None] = None

    def __init__(
        self,
        transformer,
        vae,
        scheduler,
        reference_net=None,
        text_encoder=None,
        tokenizer=None,
        audio_encoder=None,
        feature_extractor=None,
        face_analyzer=None,
        height: int = geometry.RELEASE["height"],
        width: int = geometry.RELEASE["width"],
        clip_length: int = geometry.RELEASE["clip_length"],
        motion_frames: int = geometry.RELEASE["motion_frames"],
        fps: int = geometry.RELEASE["fps"],
        text_length: int = geometry.RELEASE["text_length"],
        default_steps: int = options.RELEASE["steps"],
        default_guidance_scale: float = options.RELEASE["cfg"],
        default_prompt: str = options.RELEASE["default_prompt"],
    ):
        super().__init__()
        self.register_modules(
            transformer=transformer, vae=vae, scheduler=scheduler, reference_net=reference_net,
            text_encoder=text_encoder, tokenizer=tokenizer, audio_encoder=audio_encoder,
            feature_extractor=feature_extractor,
        )
        self.register_to_config(height=height, width=width, clip_length=clip_length, motion_frames=motion_frames,
                                fps=fps, text_length=text_length, default_steps=default_steps,
                                default_guidance_scale=default_guidance_scale, default_prompt=default_prompt)
        self.face_analyzer = face_analyzer
        self.parallel = None  # a parallel.ParallelConfig: this process is one rank of a --parallel video render

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> Hallo3Pipeline:
        """A folder with a ``model_index.json`` (what ``hallo3 download`` leaves, or ``save_pretrained`` writes),
        or the name of a model preset (``hallo3``, ``tiny-random``, ...; ``torch_dtype`` and ``device`` accepted),
        which :func:`hallo3_cli.load_pipeline` builds."""
        name = str(pretrained_model_name_or_path)
        path = Path(name).expanduser()
        if (path / "model_index.json").is_file():
            # model_index.json names our modules; diffusers resolves them from those already imported
            import hallo3_cli.models  # noqa: F401
            import hallo3_cli.models.tokenization_hashed  # noqa: F401  (the folder of a random preset names it)
            import hallo3_cli.scheduling_hallo3  # noqa: F401

            face = kwargs.pop("face_analyzer", _FROM_FOLDER)  # None: run without face models
            pipe = super().from_pretrained(str(path), **kwargs)
            if face is _FROM_FOLDER:
                face = None
                if (path / FACE_FOLDER).is_dir():
                    from hallo3_cli.face import FaceAnalyzer

                    face = FaceAnalyzer.from_dir(path / FACE_FOLDER)
            pipe.face_analyzer = face
            return pipe
        if cls.name_loader is None:
            raise Hallo3Error(f"{name!r} is not a folder with a model_index.json; load model presets with "
                              "hallo3_cli.load_pipeline (or import Hallo3Pipeline from hallo3_cli)")
        return cls.name_loader(name, **kwargs)

    def _module(self, name: str):
        """A component this step needs, or a clear error if the pipeline was built without it."""
        module = getattr(self, name, None)
        if module is None:
            raise Hallo3Error(f"this pipeline has no {name}; build it with all its components (from_pretrained, or "
                              f"hallo3_cli.load_pipeline) or pass {name}= to the constructor")
        return module

    @property
    def execution_device(self) -> torch.device:
        """Where the networks run (diffusers' answer, which follows offloading hooks)."""
        return self._execution_device

    # -- geometry (the pipeline's config: known before any network loads) -----------------------
    @property
    def height(self) -> int:
        return self.config.height

    @property
    def width(self) -> int:
        return self.config.width

    @property
    def clip_length(self) -> int:
        return self.config.clip_length

    @property
    def latent_frames(self) -> int:
        return geometry.latent_frames(self.clip_length)

    @property
    def text_length(self) -> int:
        return self.config.text_length

    @property
    def vae_scale(self) -> float:
        return float(self._module("vae").config.scaling_factor)

    def enable_vae_tiling(self) -> None:
        self._module("vae").enable_tiling()

    def disable_vae_tiling(self) -> None:
        self._module("vae").disable_tiling()

    # -- stage: audio ---------------------------------------------------------------------------
    @torch.no_grad()
    def encode_audio(self, audio: str | os.PathLike | np.ndarray, *, progress: bool = False,
                     pad_to_clips: bool = True) -> Hallo3Audio:
        """Speech (a file any FFmpeg build decodes, or 16 kHz mono float samples) → wav2vec features per
        video frame (docs/model.md §5 steps 2–4; long recordings in bounded memory, see :mod:`hallo3_cli.audio`).

        ``pad_to_clips=False``: the recording is not zero-padded to whole clips before wav2vec (the release's
        training data, docs/model.md §10.1: the features then differ from inference's near the end, since the
        encoder attends over the padding too)."""
        from hallo3_cli.audio import compute_features
        from hallo3_cli.audio_io import check_waveform, load_audio

        extractor = self._module("feature_extractor")
        rate = int(extractor.sampling_rate)
        if isinstance(audio, np.ndarray):
            waveform = check_waveform(audio, "audio")
        elif isinstance(audio, (str, os.PathLike)):
            waveform = load_audio(audio, rate)
        else:
            raise TypeError(f"audio must be a file path or an array of {rate} Hz mono samples, got {type(audio).__name__}")
        features, num_frames = compute_features(
            waveform, self._module("audio_encoder"), fps=self.config.fps, clip_length=self.clip_length if pad_to_clips else 0,
            normalize=bool(extractor.do_normalize), progress=progress,
        )
        return Hallo3Audio(features.float().contiguous(), num_frames)

    # -- stage: reference -----------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompt(self, prompt: str) -> torch.Tensor:
        """T5 prompt embedding ``(text tokens, width)`` in the text encoder's dtype, on the CPU: padded to the
        DiT's text length, no attention mask (the official conditioner and diffusers' CogVideoX pipeline
        both let padding tokens through)."""
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
        tokenizer, encoder = self._module("tokenizer"), self._module("text_encoder")
        ids = tokenizer(prompt, padding="max_length", max_length=self.text_length, truncation=True,
                        add_special_tokens=True, return_tensors="pt").input_ids
        return encoder(ids.to(self.execution_device))[0][0].to(encoder.dtype).cpu()

    @torch.no_grad()
    def encode_reference_latent(self, masked: torch.Tensor) -> torch.Tensor:
        """The framed face-masked image ``(3, H, W)`` in [-1, 1] → its VAE latent ``(1, 1, 16, h, w)`` ×scale."""
        return vae_latents(self._module("vae"), masked[None, None], torch.Generator().manual_seed(REFERENCE_SEED),
                           self.vae_scale, self.execution_device)

    @torch.no_grad()
    def reference_features(self, ref_latent: torch.Tensor, prompt_embeds: torch.Tensor) -> torch.Tensor:
        """The reference network's per-layer bank ``(layers, tokens, width)`` (docs/model.md §3): unconditional
        (zero text, the shape of ``prompt_embeds``), timestep 0."""
        network = self._module("reference_net")
        uncond = torch.zeros(1, *prompt_embeds.shape[-2:], device=self.execution_device, dtype=network.dtype)
        bank = reference_bank(network, ref_latent.to(self.execution_device, network.dtype), uncond)
        return torch.stack([entry[0] for entry in bank])

    def frame_portrait(self, image) -> Hallo3Portrait:
        """Portrait (path, PIL image, or RGB array: uint8, or float in [0, 1]) → its framing, before any network
        runs: face analysis on the original image (as the official code), the face mask, the image and the
        face-masked image framed to the model's size (docs/model.md §7.1), the face box in the frame. Cheap (CPU,
        no GPU work): what a preview shows before a render."""
        from hallo3_cli.face import FaceResult, face_mask
        from hallo3_cli.image_io import frame_box, frame_image, load_image, rgb_array

        label = f"{image}: " if isinstance(image, (str, os.PathLike)) else ""
        if isinstance(image, (str, os.PathLike)):
            image = load_image(image)
        rgb = rgb_array(image, "image")
        height, width = rgb.shape[:2]
        analyzer = self.face_analyzer
        face = analyzer.analyze(rgb) if analyzer is not None else FaceResult.no_face(height, width)
        if not face.found:
            why = "the model has no face models" if analyzer is None else "no face was detected"
            log.warning("%s%s; using a zero face embedding and the whole image as the face region", label, why)

        pixels = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255.0
        mask = torch.from_numpy(face_mask(face.box, height, width))
        framed, framing = frame_image(pixels, self.height, self.width)
        framed_ref, _ = frame_image(pixels * mask, self.height, self.width)
        box = frame_box(tuple(float(v) for v in face.box), width, height, self.height, self.width)
        box = torch.tensor([int(np.floor(box[0])), int(np.floor(box[1])), int(np.ceil(box[2])), int(np.ceil(box[3]))],
                           dtype=torch.int32)
        framed_mask, _ = frame_image(mask.expand(3, -1, -1), self.height, self.width)
        return Hallo3Portrait(image=framed, masked=framed_ref, mask=framed_mask[0] > 0, face_box=box, face=face,
                              framing=framing, source_width=width, source_height=height)

    @torch.no_grad()
    def encode_reference(self, image, prompt: str | None = None, *, prompt_embeds: torch.Tensor | None = None,
                         portrait: Hallo3Portrait | None = None) -> Hallo3Reference:
        """Portrait (path, PIL image or RGB array) → its identity: :meth:`frame_portrait`, then the masked image's
        VAE latent, the prompt embedding (``prompt_embeds`` when given: T5 is then not needed) and the reference
        network's bank. ``portrait``: an earlier :meth:`frame_portrait` of the same image."""
        prompt = self.config.default_prompt if prompt is None else prompt
        portrait = self.frame_portrait(image) if portrait is None else portrait
        ref_latent = self.encode_reference_latent(portrait.masked)
        if prompt_embeds is None:
            prompt_embeds = self.encode_prompt(prompt)
        bank = self.reference_features(ref_latent, prompt_embeds)
        face = portrait.face
        return Hallo3Reference(
            image=portrait.image, ref_latent=ref_latent[0, 0].float().cpu(),
            face_embedding=torch.from_numpy(np.asarray(face.embedding, np.float32)), face_box=portrait.face_box,
            prompt_embeds=prompt_embeds.cpu(), ref_bank=bank.cpu(), framing=portrait.framing,
            source_width=portrait.source_width, source_height=portrait.source_height, face_found=bool(face.found),
            prompt=prompt, mask=portrait.mask,
        )

    # -- stage: clips ---------------------------------------------------------------------------
    @torch.no_grad()
    def prepare_context(self, reference: Hallo3Reference) -> Hallo3Context:
        """What every clip of a render shares, on the device: the CFG pairs of the text and of the face tokens,
        the unconditional audio tokens (projected once per render) and the reference bank. The unconditional
        half is :meth:`~hallo3_cli.conditioning.DiTConditions.unconditional` (docs/model.md §6)."""
        model = self._module("transformer")
        device, dtype = self.execution_device, model.dtype
        config = model.config
        silence = torch.zeros(1, self.clip_length, config.audio_window, config.audio_layers, config.audio_channels,
                              device=device, dtype=dtype)
        cond = DiTConditions(prompt_embeds=reference.prompt_embeds.to(device, dtype)[None],
                             face_embeds=reference.face_embedding.to(device, dtype)[None], audio_embeds=silence)
        uncond = cond.unconditional()
        return Hallo3Context(
            text=torch.cat([uncond.prompt_embeds, cond.prompt_embeds]),
            face_tokens=model.project_face(torch.cat([uncond.face_embeds, cond.face_embeds])),
            uncond_audio_tokens=model.project_audio(uncond.audio_embeds),
            bank=[entry[None] for entry in reference.ref_bank.to(device, dtype)],
        )

    @torch.no_grad()
    def prepare_condition(self, image: torch.Tensor, motion: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """VAE latent of ``[image, m(motion_1), m(motion_2)]`` ×scale, zero-padded to the clip's latent frames
        (docs/model.md §7.3); ``m`` zeroes one random pixel mask shared by both motion frames."""
        _, height, width = image.shape
        keep = motion_mask(height, width, generator).to(motion.dtype)
        frames = torch.cat([image[None], motion * keep])[None]  # (1, 3, 3, H, W)
        latent = vae_latents(self._module("vae"), frames, generator, self.vae_scale, self.execution_device)
        pad = torch.zeros(1, self.latent_frames - 1, *latent.shape[2:], device=latent.device, dtype=latent.dtype)
        return torch.cat([latent, pad], dim=1)

    def prepare_latents(self, condition: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The initial noise ``(1, latent_frames, 16, h, w)`` float32 on the CPU (the sampler's state lives
        there, drawn from the clip's generator)."""
        shape = (1, condition.shape[1], geometry.LATENT_CHANNELS, *condition.shape[3:])
        return sampler.initial_noise(shape, generator) * self.scheduler.init_noise_sigma

    @torch.no_grad()
    def project_audio(self, audio: torch.Tensor, context: Hallo3Context) -> torch.Tensor:
        """A clip's windowed audio ``(1, clip_length, window, layers, channels)`` → the CFG pair of audio tokens
        (once per clip, outside the step loop)."""
        model = self._module("transformer")
        return torch.cat([context.uncond_audio_tokens, model.project_audio(audio.to(self.execution_device, model.dtype))])

    def velocity(self, latents: torch.Tensor, timestep, condition: torch.Tensor, *, text: torch.Tensor,
                 face_tokens: torch.Tensor, audio_tokens: torch.Tensor | None, bank: list[torch.Tensor],
                 attention_kwargs: dict[str, Any] | None = None) -> torch.Tensor:
        """One conditional DiT call (:func:`~hallo3_cli.conditioning.dit_velocity`) on this pipeline's transformer,
        batch first, on its device and dtype: the v-prediction in the model's dtype. Not ``no_grad``."""
        model = self._module("transformer")
        device, dtype = self.execution_device, model.dtype
        batch = latents.shape[0]
        t = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1).expand(batch).to(device)
        with self._cache_context(model):
            return dit_velocity(model, latents.to(device, dtype), t, condition.to(device, dtype), prompt_embeds=text,
                                face_tokens=face_tokens, audio_tokens=audio_tokens, bank=bank,
                                attention_kwargs=attention_kwargs)

    @torch.no_grad()
    def guided_velocity(self, latents: torch.Tensor, timestep, condition: torch.Tensor, audio_tokens: torch.Tensor,
                        context: Hallo3Context, guidance_scale: float) -> torch.Tensor:
        """THE denoiser call of sampling: the unconditional and conditional halves as one batch through
        :meth:`velocity`, combined with classifier-free guidance. Returns the guided v-prediction, float32, on
        the latents' device.

        The release guides on x0 (docs/model.md §6); x0 is affine in v for a given state and alpha, so guiding v
        is the same maths and lets any diffusers scheduler consume it."""
        v = self.velocity(torch.cat([latents, latents]), timestep, torch.cat([condition, condition]),
                          text=context.text, face_tokens=context.face_tokens, audio_tokens=audio_tokens,
                          bank=context.bank).float().to(latents.device)
        return sampler.cfg(v[:1], v[1:], guidance_scale)

    def _cache_context(self, model):
        if not getattr(model, "is_cache_enabled", False):
            return contextlib.nullcontext()
        return model.cache_context("cfg")  # one cache state: the CFG halves run as one batch

    @torch.no_grad()
    def denoise(
        self,
        condition: torch.Tensor,
        audio: torch.Tensor,
        context: Hallo3Context,
        generator: torch.Generator,
        num_inference_steps: int,
        guidance_scale: float,
        *,
        clip_index: int = 0,
        latents: torch.Tensor | None = None,
        noise: Sequence | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        progress_bar=None,
    ) -> torch.Tensor:
        """Sample one clip's latents ``(1, latent_frames, 16, h, w)`` float32 with the pipeline's scheduler.

        ``latents``: the initial noise (default: drawn from ``generator``). ``noise``: per-step noise to replay
        (one entry per step, each a tensor or a sequence in draw order, handed to the scheduler as
        ``variance_noise``), e.g. a recorded official run. ``callback_on_step_end(pipe, step, timestep,
        callback_kwargs)`` as in diffusers; it may return replaced ``latents``. A non-finite state stops
        with :class:`~hallo3_cli.errors.NonFiniteError` naming the clip and step."""
        import inspect

        model = self._module("transformer")
        scheduler = self.scheduler
        audio_tokens = self.project_audio(audio, context)
        scheduler.set_timesteps(num_inference_steps)
        timesteps = scheduler.timesteps
        x = self.prepare_latents(condition, generator) if latents is None else latents.to(torch.float32)
        accepts = set(inspect.signature(scheduler.step).parameters)
        if getattr(model, "is_cache_enabled", False):
            model._reset_stateful_cache()  # every clip starts from pure noise: no carry-over between clips
        for i, t in enumerate(timesteps):
            velocity = self.guided_velocity(scheduler.scale_model_input(x, t), t, condition, audio_tokens, context, guidance_scale)
            extra = {}
            if "generator" in accepts:
                extra["generator"] = generator
            if noise is not None:
                extra["variance_noise"] = noise[i]
            x = scheduler.step(velocity, t, x, **extra, return_dict=False)[0]
            if not torch.isfinite(x).all():
                raise NonFiniteError.at(clip=clip_index + 1, step=f"{i + 1}/{len(timesteps)}")
            if callback_on_step_end is not None:
                local = {"latents": x}
                outputs = callback_on_step_end(self, i, t, {k: local[k] for k in callback_on_step_end_tensor_inputs}) or {}
                x = outputs.get("latents", x)
            if progress_bar is not None:
                progress_bar.update()
        return x

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents ``(1, latent_frames, 16, h, w)`` → frames ``(clip_length, 3, H, W)`` in [-1, 1].

        Clamped as the official code does (to [0, 1] after ``(x + 1) / 2``), so the last two frames are
        exactly the motion frames of the next clip (docs/model.md §7.5)."""
        vae = self._module("vae")
        z = (latents.to(self.execution_device, vae.dtype) / self.vae_scale).permute(0, 2, 1, 3, 4)
        video = vae.decode(z).sample[0].permute(1, 0, 2, 3).float()
        return ((video + 1) / 2).clamp(0, 1) * 2 - 1

    @staticmethod
    def check_media(image, audio) -> None:
        """``image`` and ``audio`` of a render, checked before any work (a file must exist, an array must be usable):
        ``TypeError``/``ValueError`` naming the argument, or the one-line error of a missing file."""
        from PIL import Image

        from hallo3_cli.audio_io import check_waveform
        from hallo3_cli.fsutil import require_file
        from hallo3_cli.image_io import rgb_array

        for name, value in (("image", image), ("audio", audio)):
            if value is None:
                raise ArgumentError(f"{name} is required (a file path, or the {name} itself in memory)")
        if isinstance(image, (str, os.PathLike)):
            require_file(image)
        elif isinstance(image, np.ndarray):
            rgb_array(image, "image")
        elif not isinstance(image, Image.Image):
            raise TypeError(f"image must be a file path, a PIL image or an (H, W, 3) RGB array, got {type(image).__name__}")
        if isinstance(audio, (str, os.PathLike)):
            require_file(audio)
        elif isinstance(audio, np.ndarray):
            check_waveform(audio, "audio")
        else:
            raise TypeError(f"audio must be a file path or a 1-D array of 16 kHz mono samples, got {type(audio).__name__}")

    def check_inputs(self, num_inference_steps, guidance_scale, output_type="np", callback_on_step_end_tensor_inputs=("latents",)):
        """The settings of a render, checked before any work: :class:`~hallo3_cli.errors.ArgumentError` (a
        ``ValueError``) naming the argument."""
        try:
            options.check_steps(num_inference_steps, "num_inference_steps")
            options.check_guidance(guidance_scale, "guidance_scale")
        except ValueError as err:
            raise ArgumentError(str(err)) from None
        if output_type not in OUTPUT_TYPES:
            raise ArgumentError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
        unknown = set(callback_on_step_end_tensor_inputs) - set(self._callback_tensor_inputs)
        if unknown:
            raise ArgumentError(f"callback_on_step_end_tensor_inputs may name {self._callback_tensor_inputs}, got {sorted(unknown)}")

    def generate_clips(
        self,
        audio: Hallo3Audio,
        reference: Hallo3Reference,
        *,
        seed: int = 42,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        finished: Sequence[torch.Tensor] = (),
        decode_finished: bool = False,
        decode_last: bool = True,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        callback_on_clip_start: Callable | None = None,
        progress: bool = True,
    ) -> Iterator[Hallo3Clip]:
        """Every clip of the video in order (docs/model.md §7), as it is finished.

        ``finished``: latents of clips already rendered (a resume): they are yielded first (decoded only if
        ``decode_finished``; the last one always, since its frames seed the next clip). Fresh clips come
        with their frames (the decode is needed for the motion frames anyway). ``callback_on_clip_start(pipe,
        index, num_clips)`` runs before each fresh clip. ``decode_last=False``: the last clip comes without
        frames (nothing needs them when only latents are kept: one VAE decode less). Under ``--parallel video`` (``self.parallel``) only
        rank 0 decodes: the other ranks' clips come without frames."""
        if not isinstance(audio, Hallo3Audio):
            raise TypeError(f"audio must be a Hallo3Audio (from encode_audio), got {type(audio).__name__}")
        if not isinstance(reference, Hallo3Reference):
            raise TypeError(f"reference must be a Hallo3Reference (from encode_reference), got {type(reference).__name__}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        steps = self.config.default_steps if num_inference_steps is None else num_inference_steps
        scale = self.config.default_guidance_scale if guidance_scale is None else guidance_scale
        self.check_inputs(steps, scale, "np", callback_on_step_end_tensor_inputs)
        motion_frames = self.config.motion_frames
        total = geometry.num_clips(audio.num_frames, self.clip_length, motion_frames)
        if len(finished) > total:
            raise Hallo3Error(f"{len(finished)} finished clips given for a {total}-clip video")
        image = reference.image.float()
        motion = image[None].expand(motion_frames, -1, -1, -1)  # clip 0: the image twice (docs/model.md §7.3)
        context = None
        for index in range(total):
            if index < len(finished):
                latents = finished[index]
                needs_motion = index == len(finished) - 1 and index < total - 1
                decode = (decode_finished or needs_motion) and self._decodes
                frames = self.decode_latents(latents[None]) if decode else None
                if needs_motion:
                    motion = self._next_motion(frames, motion)
                yield Hallo3Clip(index, total, latents, frames if decode_finished else None)
                continue
            if context is None:
                context = self.prepare_context(reference)
            if callback_on_clip_start is not None:
                callback_on_clip_start(self, index, total)
            generator = clip_generator(seed, index)
            condition = self.prepare_condition(image, motion, generator)
            audio_clip = clip_audio(audio.features, index, self.clip_length, motion_frames)[None]
            bar = self.progress_bar(total=steps) if progress else None
            latents = self.denoise(condition, audio_clip, context, generator, steps, scale, clip_index=index,
                                   callback_on_step_end=callback_on_step_end,
                                   callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
                                   progress_bar=bar)
            if bar is not None:
                bar.close()
            latents = latents.to(self._module("transformer").dtype)[0].cpu()  # what is stored is exactly what is decoded
            wanted = decode_last or index < total - 1
            frames = self.decode_latents(latents[None]) if self._decodes and wanted else None
            if index < total - 1:
                motion = self._next_motion(frames, motion)
            yield Hallo3Clip(index, total, latents, frames)

    @property
    def _decodes(self) -> bool:
        """Whether this process decodes clips: always, except ranks > 0 of a ``--parallel video`` render."""
        return self.parallel is None or self.parallel.is_main

    def _next_motion(self, frames: torch.Tensor | None, previous: torch.Tensor) -> torch.Tensor:
        """The next clip's motion frames: the last frames of this clip. Under ``--parallel video`` rank 0
        decodes and sends them to the other ranks (one VAE decode per clip, and every rank conditions the
        next clip on the same bits)."""
        count = self.config.motion_frames
        motion = frames[-count:].cpu() if frames is not None else torch.empty(previous.shape, dtype=torch.float32)
        if self.parallel is not None and self.parallel.enabled:
            import torch.distributed as dist

            device = self.parallel.device if self.parallel.device.type == "cuda" else torch.device("cpu")
            buffer = motion.to(device, torch.float32).contiguous()
            dist.broadcast(buffer, src=0)
            motion = buffer.cpu()
        return motion

    def output_crop(self, framing: str) -> tuple[int, int, int, int]:
        from hallo3_cli.image_io import crop_box_for_output

        return crop_box_for_output(framing, self.height, self.width)

    @torch.no_grad()
    def __call__(
        self,
        image,
        audio,
        prompt: str | None = None,
        seed: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        generator: torch.Generator | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        callback_on_clip_end: Callable | None = None,
    ) -> Hallo3PipelineOutput | tuple:
        """Render the whole video.

        ``image``: portrait (path, PIL image, or RGB array: uint8 or float in [0, 1]); ``audio``: speech (path or
        16 kHz mono float samples); ``prompt``: None = the default. ``seed`` (default 42; or the ``generator``'s
        initial seed) seeds one generator per clip. ``num_inference_steps``/``guidance_scale``: None = the
        pipeline's defaults (the release: 50, 3.5). ``callback_on_step_end`` as in diffusers;
        ``callback_on_clip_end(pipe, clip)`` gets each :class:`Hallo3Clip` as it is finished. Arguments are
        checked before any work (``ValueError``/``TypeError`` naming the argument).
        """
        self.check_media(image, audio)
        if prompt is not None and not isinstance(prompt, str):
            raise TypeError(f"prompt must be a string or None, got {type(prompt).__name__}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
        steps = self.config.default_steps if num_inference_steps is None else num_inference_steps
        scale = self.config.default_guidance_scale if guidance_scale is None else guidance_scale
        self.check_inputs(steps, scale, output_type, callback_on_step_end_tensor_inputs)
        if seed is None:
            seed = generator.initial_seed() if generator is not None else 42
        features = self.encode_audio(audio)
        reference = self.encode_reference(image, prompt)
        crop = self.output_crop(reference.framing)
        remaining = features.num_frames
        latents, pieces = [], []
        for clip in self.generate_clips(features, reference, seed=seed, num_inference_steps=steps, guidance_scale=scale,
                                        callback_on_step_end=callback_on_step_end,
                                        callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs):
            latents.append(clip.latents)
            if output_type != "latent" and self._decodes:  # (ranks > 0 of a parallel render decode nothing)
                new = geometry.new_frames(clip.frames, self.config.motion_frames, remaining)
                remaining -= len(new)
                pieces.append(new[:, :, crop[1]:crop[3], crop[0]:crop[2]].cpu())
            if callback_on_clip_end is not None:
                callback_on_clip_end(self, clip)
        self.maybe_free_model_hooks()
        stacked = torch.stack(latents)
        frames = None
        if output_type != "latent" and self._decodes:
            from hallo3_cli.video_io import tensor_to_uint8

            video = torch.cat(pieces)
            if output_type == "pt":
                frames = (video + 1) / 2
            else:
                frames = tensor_to_uint8(video)
                if output_type == "pil":
                    frames = self.numpy_to_pil(frames)
        if not return_dict:
            return frames, stacked
        return Hallo3PipelineOutput(frames=frames, latents=stacked, fps=self.config.fps)
