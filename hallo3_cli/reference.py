"""``encode-ref``: a portrait → its identity stage file (SPEC §3, §4, §7.1).

Face analysis runs on the original image (as the official code does); the face-masked image and
the image itself are then framed to the model's size. The reference network's per-layer bank is
computed here, once per portrait, and stored: no clip recomputes it.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import numpy as np
import torch

from hallo3_cli import fsutil, stages

log = logging.getLogger("hallo3")

#: Seed of the VAE posterior sample of the reference latent (the official code samples too).
REFERENCE_SEED = 0


class ReferenceEncoder:
    """Face analyzer, T5 and reference DiT on top of a :class:`~hallo3_cli.render.Renderer`'s VAE.

    The big one-shot networks (T5-XXL, reference DiT) are loaded on first use and dropped by
    :meth:`release` as soon as their outputs exist.
    """

    def __init__(self, renderer):
        self.renderer = renderer
        self.preset = renderer.preset
        self._face = self._text = self._reference = None
        self._face_loaded = False

    @property
    def face_analyzer(self):
        if not self._face_loaded:
            from hallo3_cli.face import load_face_analyzer, providers_for_device

            self._face = load_face_analyzer(self.preset, providers_for_device(self.renderer.device))
            self._face_loaded = True
        return self._face

    @property
    def text_encoder(self):
        if self._text is None:
            from hallo3_cli.loading import load_text_encoder

            tokenizer, encoder = load_text_encoder(self.preset, self.renderer.load_device, self.renderer.dtype)
            self._text = tokenizer, self.renderer.place(encoder, block_modules=["encoder"])  # T5 blocks: encoder.block
        return self._text

    @property
    def reference_net(self):
        if self._reference is None:
            from hallo3_cli.loading import load_reference

            self._reference = self.renderer.place(load_reference(self.preset, self.renderer.load_device, self.renderer.dtype))
        return self._reference

    def release(self) -> None:
        """Free T5 and the reference DiT (each is needed once per portrait)."""
        self.release_text_encoder()
        if self._reference is not None:
            self.renderer.forget(self._reference)
            self._reference = None

    def release_text_encoder(self) -> None:
        if self._text is not None:
            self.renderer.forget(self._text[1])
            self._text = None

    @property
    def weights(self) -> str:
        return self.preset.fingerprint(*stages.weights_components(stages.REFERENCE, self.preset))

    @torch.no_grad()
    def encode(self, image_path: str | Path, output: str | Path, prompt: str | None = None, preview: str | Path | None = None) -> Path:
        """Write the reference stage file of ``image_path`` to ``output`` (and the preview PNG)."""
        from hallo3_cli.face import FaceResult, face_mask
        from hallo3_cli.image_io import frame_box, frame_image, load_image
        from hallo3_cli.loading import encode_prompt

        output, *_ = fsutil.check_outputs([(output, fsutil.STAGE_SUFFIXES), (preview, fsutil.PREVIEW_SUFFIXES)], inputs=[image_path])
        preset, device, dtype = self.preset, self.renderer.device, self.renderer.dtype
        prompt = preset.default_prompt if prompt is None else prompt
        image = load_image(image_path)
        rgb = np.array(image)  # writable copy: torch.from_numpy below
        height, width = rgb.shape[:2]

        analyzer = self.face_analyzer
        face = analyzer.analyze(rgb) if analyzer is not None else FaceResult.no_face(height, width)
        if not face.found:
            why = "the model preset has no face models" if analyzer is None else "no face was detected"
            log.warning("%s: %s; using a zero face embedding and the whole image as the face region", image_path, why)

        pixels = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255.0
        mask = torch.from_numpy(face_mask(face.box, height, width))
        masked = pixels * mask
        framed, framing = frame_image(pixels, preset.height, preset.width)
        framed_ref, _ = frame_image(masked, preset.height, preset.width)

        vae = self.renderer.vae
        posterior = vae.encode(framed_ref[None, :, None].to(device, dtype)).latent_dist
        generator = torch.Generator().manual_seed(REFERENCE_SEED)
        ref_latent = posterior.sample(generator=generator) * preset.vae_scale  # (1, 16, 1, h, w)
        ref_latent = ref_latent.permute(0, 2, 1, 3, 4)  # (1, 1, 16, h, w)

        self.renderer.done_with(vae)

        tokenizer, text_encoder = self.text_encoder
        prompt_embeds = encode_prompt(tokenizer, text_encoder, prompt, preset.text_length, device).to(dtype)
        self.release_text_encoder()  # T5-XXL is not needed again: free it before the reference DiT loads
        uncond = torch.zeros(1, *prompt_embeds.shape, device=device, dtype=dtype)  # the ref pass is unconditional (SPEC §3)
        bank = torch.stack([entry[0] for entry in self.reference_net(hidden_states=ref_latent, encoder_hidden_states=uncond)])
        self.renderer.done_with(self._reference)

        box = frame_box(tuple(float(v) for v in face.box), width, height, preset.height, preset.width)
        box = torch.tensor([int(np.floor(box[0])), int(np.floor(box[1])), int(np.ceil(box[2])), int(np.ceil(box[3]))], dtype=torch.int32)
        # All or nothing: the preview is written (to its temporary name) first and renamed into place
        # only once the stage file is written.
        with fsutil.atomic_path(preview) if preview is not None else contextlib.nullcontext() as preview_tmp:
            if preview_tmp is not None:
                framed_mask, _ = frame_image(mask.expand(3, -1, -1), preset.height, preset.width)
                write_preview(preview_tmp, framed, framed_mask[0] > 0, box.tolist())
            path = stages.save_stage(
                output,
                stages.REFERENCE,
                {
                    "image": framed,
                    "ref_latent": ref_latent[0, 0].float().cpu(),
                    "face_embedding": torch.from_numpy(np.asarray(face.embedding, np.float32)),
                    "face_box": box,
                    "prompt_embeds": prompt_embeds.cpu(),
                    "ref_bank": bank.cpu(),
                },
                {
                    "model": preset.name,
                    "weights": self.weights,
                    "params": {"height": preset.height, "width": preset.width, "reference_seed": REFERENCE_SEED,
                               "dtype": str(dtype).removeprefix("torch."), "weights_dtype": self.renderer.runtime.weights_dtype},
                    "source_sha256": fsutil.sha256_file(image_path),
                    "framing": framing,
                    "source_width": width,
                    "source_height": height,
                    "face_found": bool(face.found),
                    "prompt": prompt,
                },
            )
        return path


def write_preview(path: str | Path, framed: torch.Tensor, inside: torch.Tensor, box: list[int]) -> Path:
    """The framed image with the face box drawn and the area outside the face mask dimmed (PNG)."""
    from PIL import Image, ImageDraw

    image = ((framed.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    inside = inside.numpy()
    image = np.where(inside[..., None], image, (image * 0.45).astype(np.uint8))
    picture = Image.fromarray(image)
    draw = ImageDraw.Draw(picture)
    draw.rectangle([box[0], box[1], max(box[0], box[2] - 1), max(box[1], box[3] - 1)], outline=(0, 255, 0), width=2)
    with fsutil.atomic_path(path) as tmp:
        picture.save(tmp, format="PNG")
    return Path(path)
