"""Load (release) or build (random presets) each network of a preset.

Every loader takes a :class:`~hallo3_cli.presets.Preset`, a device and a dtype. Release weights come
from ``<model home>/<preset>/<component>/``; random presets build the same architectures at the
widths given in ``models.toml`` and fill them with :func:`~hallo3_cli.presets.fill_random_`.
"""

from __future__ import annotations

import torch

from hallo3_cli.presets import Preset, fill_random_

# Salts so that each random component gets its own weights from the preset's seed.
_SALT = {"transformer": 1, "reference": 2, "vae": 3, "text_encoder": 4, "wav2vec": 5}


def _random(module: torch.nn.Module, preset: Preset, component: str) -> torch.nn.Module:
    fill_random_(module, preset.seed * 100 + _SALT[component], std=0.02)
    return module.eval().requires_grad_(False)


def _device_map(device) -> dict:
    """Load release weights straight onto an accelerator (no full copy in host RAM first)."""
    return {"device_map": str(device)} if str(device).startswith("cuda") else {}


def _finish(module: torch.nn.Module, device, dtype) -> torch.nn.Module:
    if any(p.dtype != dtype for p in module.parameters()):
        module = module.to(dtype=dtype)
    return module.to(device=device).eval().requires_grad_(False)


def transformer_config(preset: Preset, *, main: bool) -> dict:
    """The diffusers config of a random preset's DiT (geometry from the preset, widths from models.toml)."""
    widths = preset.config("transformer")
    wav2vec = preset.config("wav2vec")
    config = {
        "num_layers": widths["num_layers"],
        "num_attention_heads": widths["num_attention_heads"],
        "attention_head_dim": widths.get("attention_head_dim", 64),
        "time_embed_dim": widths["time_embed_dim"],
        "text_embed_dim": preset.config("text_encoder")["d_model"],
        "sample_height": preset.height // 8,
        "sample_width": preset.width // 8,
        "sample_frames": preset.clip_length,
        "max_text_seq_length": preset.text_length,
    }
    if main:
        config.update(
            audio_layers=wav2vec["num_hidden_layers"],
            audio_channels=wav2vec["hidden_size"],
            audio_intermediate_dim=widths["audio_intermediate_dim"],
            audio_cross_attention_dim=widths["audio_cross_attention_dim"],
            face_cross_attention_dim=widths["face_cross_attention_dim"],
        )
    return config


def load_transformer(preset: Preset, device="cpu", dtype=torch.float32):
    """The main DiT (:class:`Hallo3Transformer3DModel`)."""
    from hallo3_cli.models import Hallo3Transformer3DModel

    if preset.is_random:
        model = _random(Hallo3Transformer3DModel(**transformer_config(preset, main=True)), preset, "transformer")
    else:
        model = Hallo3Transformer3DModel.from_pretrained(preset.require("transformer"), torch_dtype=dtype, **_device_map(device))
    return _finish(model, device, dtype)


def load_reference(preset: Preset, device="cpu", dtype=torch.float32):
    """The reference DiT (:class:`Hallo3ReferenceNet`)."""
    from hallo3_cli.models import Hallo3ReferenceNet

    if preset.is_random:
        model = _random(Hallo3ReferenceNet(**transformer_config(preset, main=False)), preset, "reference")
    else:
        model = Hallo3ReferenceNet.from_pretrained(preset.require("reference"), torch_dtype=dtype, **_device_map(device))
    return _finish(model, device, dtype)


def load_vae(preset: Preset, device="cpu", dtype=torch.float32):
    """diffusers ``AutoencoderKLCogVideoX`` (the CogVideoX causal 3D VAE)."""
    from diffusers import AutoencoderKLCogVideoX

    if preset.is_random:
        widths = preset.config("vae")
        blocks = len(widths["block_out_channels"])
        model = AutoencoderKLCogVideoX(
            block_out_channels=tuple(widths["block_out_channels"]),
            down_block_types=("CogVideoXDownBlock3D",) * blocks,
            up_block_types=("CogVideoXUpBlock3D",) * blocks,
            layers_per_block=widths["layers_per_block"],
            norm_num_groups=widths["norm_num_groups"],
            latent_channels=16,
            sample_height=preset.height,
            sample_width=preset.width,
            scaling_factor=preset.vae_scale,
        )
        model = _random(model, preset, "vae")
    else:
        model = AutoencoderKLCogVideoX.from_pretrained(preset.require("vae"), torch_dtype=dtype, **_device_map(device))
    return _finish(model, device, dtype)


def load_text_encoder(preset: Preset, device="cpu", dtype=torch.float32):
    """(tokenizer, T5 encoder). The random preset uses a tiny word-level tokenizer built in memory."""
    from transformers import T5Config, T5EncoderModel

    if preset.is_random:
        widths = preset.config("text_encoder")
        config = T5Config(
            vocab_size=widths["vocab_size"],
            d_model=widths["d_model"],
            d_kv=widths["d_kv"],
            d_ff=widths["d_ff"],
            num_layers=widths["num_layers"],
            num_heads=widths["num_heads"],
            feed_forward_proj="gated-gelu",
            is_encoder_decoder=False,
            use_cache=False,
        )
        encoder = _random(T5EncoderModel(config), preset, "text_encoder")
        tokenizer = _tiny_tokenizer(widths["vocab_size"])
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(preset.require("tokenizer"))
        encoder = T5EncoderModel.from_pretrained(preset.require("text_encoder"), torch_dtype=dtype, **_device_map(device))
    return tokenizer, _finish(encoder, device, dtype)


def _tiny_tokenizer(vocab_size: int):
    """A deterministic word-level tokenizer with T5's special ids (pad 0, eos 1, unk 2).

    Words are hashed into the vocabulary so that any prompt maps to stable ids.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    vocab.update({f"w{i}": i for i in range(3, vocab_size)})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast._hallo3_hash_words = vocab_size  # marks the hashing front end used by encode_prompt
    return fast


@torch.no_grad()
def encode_prompt(tokenizer, encoder, prompt: str, max_length: int = 226, device="cpu") -> torch.Tensor:
    """T5 prompt embedding ``(max_length, d_model)``: padded to ``max_length``, no attention mask
    (the official conditioner and diffusers' CogVideoX pipeline both let padding tokens through)."""
    import zlib

    if getattr(tokenizer, "_hallo3_hash_words", None):
        size = tokenizer._hallo3_hash_words
        prompt = " ".join(f"w{3 + zlib.crc32(word.encode()) % (size - 3)}" for word in prompt.lower().split())
    ids = tokenizer(
        prompt, padding="max_length", max_length=max_length, truncation=True, add_special_tokens=True, return_tensors="pt"
    ).input_ids
    return encoder(ids.to(device))[0][0]
