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


#: The networks of a preset by their ``models.toml`` component names.
NETWORKS = ("wav2vec", "vae", "text_encoder", "reference", "transformer")


def network_config(preset: Preset, network: str) -> dict:
    """Constructor arguments of one of a preset's networks (:data:`NETWORKS`): a random preset's from
    models.toml; the release's are the classes' defaults (tests check them against the official
    checkpoint manifest), diffusers' CogVideoX VAE defaults, T5-XXL and wav2vec2-base."""
    if network in ("transformer", "reference"):
        return transformer_config(preset, main=network == "transformer") if preset.is_random else {}
    if network == "vae":
        return vae_config(preset)
    if network == "text_encoder":
        return text_encoder_config(preset)
    if network == "wav2vec":
        return preset.config("wav2vec")
    raise ValueError(f"unknown network {network!r}; known: {', '.join(NETWORKS)}")


def build_network(network: str, config: dict) -> torch.nn.Module:
    """A network of :data:`NETWORKS` built from its config (weights as the classes initialise them)."""
    if network == "transformer":
        from hallo3_cli.models import Hallo3Transformer3DModel

        return Hallo3Transformer3DModel(**config)
    if network == "reference":
        from hallo3_cli.models import Hallo3ReferenceNet

        return Hallo3ReferenceNet(**config)
    if network == "vae":
        from diffusers import AutoencoderKLCogVideoX

        return AutoencoderKLCogVideoX(**config)
    if network == "text_encoder":
        from transformers import T5Config, T5EncoderModel

        return T5EncoderModel(T5Config(**config, is_encoder_decoder=False, use_cache=False))
    if network == "wav2vec":
        from transformers import Wav2Vec2Config, Wav2Vec2Model

        return Wav2Vec2Model(Wav2Vec2Config(**config))
    raise ValueError(f"unknown network {network!r}; known: {', '.join(NETWORKS)}")


def load_transformer(preset: Preset, device="cpu", dtype=torch.float32):
    """The main DiT (:class:`Hallo3Transformer3DModel`)."""
    from hallo3_cli.models import Hallo3Transformer3DModel

    if preset.is_random:
        model = _random(build_network("transformer", network_config(preset, "transformer")), preset, "transformer")
    else:
        model = Hallo3Transformer3DModel.from_pretrained(preset.require("transformer"), torch_dtype=dtype, **_device_map(device))
    return _finish(model, device, dtype)


def load_reference(preset: Preset, device="cpu", dtype=torch.float32):
    """The reference DiT (:class:`Hallo3ReferenceNet`)."""
    from hallo3_cli.models import Hallo3ReferenceNet

    if preset.is_random:
        model = _random(build_network("reference", network_config(preset, "reference")), preset, "reference")
    else:
        model = Hallo3ReferenceNet.from_pretrained(preset.require("reference"), torch_dtype=dtype, **_device_map(device))
    return _finish(model, device, dtype)


def vae_config(preset: Preset) -> dict:
    """The diffusers config of a preset's VAE: a random preset's widths from models.toml (the release's is
    its folder's config.json; ``AutoencoderKLCogVideoX``'s defaults are the release's architecture)."""
    if not preset.is_random:
        return {"scaling_factor": preset.vae_scale}
    widths = preset.config("vae")
    blocks = len(widths["block_out_channels"])
    return {
        "block_out_channels": tuple(widths["block_out_channels"]),
        "down_block_types": ("CogVideoXDownBlock3D",) * blocks,
        "up_block_types": ("CogVideoXUpBlock3D",) * blocks,
        "layers_per_block": widths["layers_per_block"],
        "norm_num_groups": widths["norm_num_groups"],
        "latent_channels": 16,
        "sample_height": preset.height,
        "sample_width": preset.width,
        "scaling_factor": preset.vae_scale,
    }


def text_encoder_config(preset: Preset) -> dict:
    """``T5Config`` arguments of a preset's text encoder (the release: T5-XXL v1.1)."""
    if not preset.is_random:
        return dict(T5_XXL)
    return dict(preset.config("text_encoder"), feed_forward_proj="gated-gelu")


#: The T5-XXL v1.1 encoder of the release (``THUDM/CogVideoX-5b-I2V`` ``text_encoder/config.json``).
T5_XXL = {"vocab_size": 32128, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64,
          "feed_forward_proj": "gated-gelu", "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128}


def load_vae(preset: Preset, device="cpu", dtype=torch.float32):
    """diffusers ``AutoencoderKLCogVideoX`` (the CogVideoX causal 3D VAE)."""
    from diffusers import AutoencoderKLCogVideoX

    if preset.is_random:
        model = _random(build_network("vae", vae_config(preset)), preset, "vae")
    else:
        model = AutoencoderKLCogVideoX.from_pretrained(preset.require("vae"), torch_dtype=dtype, **_device_map(device))
    return _finish(model, device, dtype)


def load_text_encoder(preset: Preset, device="cpu", dtype=torch.float32):
    """The T5 encoder (``T5EncoderModel``)."""
    from transformers import T5EncoderModel

    if preset.is_random:
        encoder = _random(build_network("text_encoder", text_encoder_config(preset)), preset, "text_encoder")
    else:
        encoder = T5EncoderModel.from_pretrained(preset.require("text_encoder"), torch_dtype=dtype, **_device_map(device))
    return _finish(encoder, device, dtype)


def load_tokenizer(preset: Preset):
    """The T5 tokenizer; random presets use :func:`tiny_tokenizer`."""
    if preset.is_random:
        return tiny_tokenizer(preset.config("text_encoder")["vocab_size"])
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(preset.require("tokenizer"))


def tiny_tokenizer(vocab_size: int):
    """A deterministic word-level tokenizer with T5's special ids (pad 0, eos 1, unk 2).

    Words are hashed into the vocabulary so that any prompt maps to stable ids; the init argument
    ``hallo3_hash_words`` (kept by ``save_pretrained``) tells ``Hallo3Pipeline.encode_prompt`` to do so.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    vocab.update({f"w{i}": i for i in range(3, vocab_size)})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   hallo3_hash_words=vocab_size)


def default_feature_extractor():
    """wav2vec2-base-960h's feature-extractor settings (16 kHz, zero-mean unit-variance normalisation)."""
    from transformers import Wav2Vec2FeatureExtractor

    from hallo3_cli.audio_io import SAMPLE_RATE

    return Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=SAMPLE_RATE, padding_value=0.0, do_normalize=True,
                                    return_attention_mask=False)


def load_feature_extractor(preset: Preset):
    """wav2vec2's ``Wav2Vec2FeatureExtractor`` (sampling rate, normalisation); must be 16 kHz."""
    from transformers import Wav2Vec2FeatureExtractor

    from hallo3_cli.audio_io import SAMPLE_RATE
    from hallo3_cli.errors import ModelError

    if preset.is_random:
        return default_feature_extractor()
    folder = preset.require("wav2vec")
    try:
        extractor = Wav2Vec2FeatureExtractor.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ModelError(f"unreadable preprocessor config ({str(err).splitlines()[0]})", folder) from None
    if extractor.sampling_rate != SAMPLE_RATE:
        raise ModelError(f"the wav2vec model expects {extractor.sampling_rate} Hz audio; hallo3 uses {SAMPLE_RATE} Hz", folder)
    return extractor


def load_audio_encoder(preset: Preset, device="cpu"):
    """The preset's wav2vec2 encoder (eval mode, float32, on ``device``). Random presets build the
    architecture from ``[<preset>.wav2vec]`` in models.toml and fill it with seeded weights."""

    from hallo3_cli.errors import ModelError

    if preset.is_random:
        model = build_network("wav2vec", preset.config("wav2vec"))
        fill_random_(model, preset.seed)
    else:
        model = _load_wav2vec(preset.require("wav2vec"))
    if model.config.do_stable_layer_norm:
        raise ModelError("pre-norm (stable layer norm) wav2vec2 variants are not supported; Hallo3 uses wav2vec2-base")
    return model.to(device=device, dtype=torch.float32).eval().requires_grad_(False)


def _load_wav2vec(folder):
    from transformers import Wav2Vec2Model
    from transformers.utils import logging as hf_logging

    from hallo3_cli.errors import ModelError

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the 960h checkpoint is a CTC model: its lm_head is unused here
    try:
        return Wav2Vec2Model.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, RuntimeError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelError(f"cannot load the wav2vec weights ({reason}); run: hallo3 download", folder) from None
    finally:
        hf_logging.set_verbosity(verbosity)


class ComponentLoader:
    """Loads one ``Hallo3Pipeline`` component of a preset at a time and places it as the runtime says
    (``runtime.Placement``): the loader behind ``Hallo3Pipeline.from_preset``. With ``parallel`` (a
    :class:`~hallo3_cli.parallel.ParallelConfig`; the runtime's device is its ``config.device``) the main
    DiT's calls are split over the process group once it is placed (``--parallel video``)."""

    def __init__(self, preset: Preset, runtime, *, allow_download: bool = False, progress: bool = True,
                 parallel=None):
        from hallo3_cli.runtime import Placement

        self.parallel = parallel
        self.parallel_state = None
        self.preset = preset
        self.runtime = runtime
        self.placement = Placement(runtime)
        self.allow_download = allow_download
        self.progress = progress

    def __call__(self, name: str):
        placement, preset = self.placement, self.preset
        device, dtype, runtime = placement.device, placement.dtype, self.runtime
        if name == "scheduler":
            from hallo3_cli.scheduling_hallo3 import Hallo3DPMSolverSDEScheduler

            return Hallo3DPMSolverSDEScheduler()
        if name == "transformer":
            model = placement.place(load_transformer(preset, placement.load_device, dtype))
            if runtime.cache is not None:
                from diffusers.hooks import FirstBlockCacheConfig

                model.enable_cache(FirstBlockCacheConfig(threshold=runtime.cache))
            if self.parallel is not None:
                from hallo3_cli.parallel import parallelize_transformer

                self.parallel_state = parallelize_transformer(model, self.parallel)
            if runtime.compile:
                model.compile_repeated_blocks(fullgraph=False, dynamic=False)
            return model
        if name == "reference_net":
            return placement.place(load_reference(preset, placement.load_device, dtype))
        if name == "vae":
            vae = load_vae(preset, placement.load_device, dtype)
            if runtime.vae_tiling:
                vae.enable_tiling()
            return placement.place(vae, blocks=False)
        if name == "text_encoder":
            return placement.place(load_text_encoder(preset, placement.load_device, dtype), block_modules=["encoder"])
        if name == "tokenizer":
            return load_tokenizer(preset)
        if name == "audio_encoder":
            return load_audio_encoder(preset, device)  # small: straight onto the device, whatever the mode
        if name == "feature_extractor":
            return load_feature_extractor(preset)
        if name == "face_analyzer":
            from hallo3_cli.face import load_face_analyzer, providers_for_device

            return load_face_analyzer(preset, providers_for_device(device))
        raise ValueError(f"unknown component {name!r}")
