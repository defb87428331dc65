"""The networks of a preset, built at their configuration: what the release's weights load into, and what a
random preset (``tiny-random``) fills with seeded weights.

The release's architectures are the classes' defaults (``Hallo3Transformer3DModel``, ``Hallo3ReferenceNet``,
diffusers' ``AutoencoderKLCogVideoX``), T5-XXL v1.1 (:data:`T5_XXL`) and wav2vec2-base; a random preset
overrides widths in ``models.toml``. Nothing here reads weight files (that is :mod:`hallo3_cli.loading`).
"""

from __future__ import annotations

import json
import os
import zlib
from typing import TYPE_CHECKING

from hallo3_cli import geometry
from hallo3_cli.components import NETWORKS, random_seed
from hallo3_cli.presets import Preset

if TYPE_CHECKING:
    import torch

#: The T5-XXL v1.1 encoder of the release (``THUDM/CogVideoX-5b-I2V`` ``text_encoder/config.json``).
T5_XXL = {"vocab_size": 32128, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64,
          "feed_forward_proj": "gated-gelu", "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128}
#: wav2vec2-base's widths that the DiT's audio projection consumes (``facebook/wav2vec2-base-960h``).
WAV2VEC2_BASE = {"hidden_size": 768, "num_hidden_layers": 12}


def transformer_config(preset: Preset, *, main: bool) -> dict:
    """Constructor arguments of a preset's DiT (main or reference) that differ from the release's (the
    classes' defaults): a random preset's widths from models.toml, geometry from the preset."""
    if not preset.is_random:
        return {}
    widths = preset.config("transformer")
    wav2vec = preset.config("wav2vec")
    height, width = geometry.latent_size(preset.height, preset.width)
    config = {
        "num_layers": widths["num_layers"],
        "num_attention_heads": widths["num_attention_heads"],
        "attention_head_dim": widths.get("attention_head_dim", 64),
        "time_embed_dim": widths["time_embed_dim"],
        "text_embed_dim": preset.config("text_encoder")["d_model"],
        "sample_height": height,
        "sample_width": width,
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
        "latent_channels": geometry.LATENT_CHANNELS,
        "sample_height": preset.height,
        "sample_width": preset.width,
        "scaling_factor": preset.vae_scale,
    }


def text_encoder_config(preset: Preset) -> dict:
    """``T5Config`` arguments of a preset's text encoder (the release: T5-XXL v1.1)."""
    if not preset.is_random:
        return dict(T5_XXL)
    return dict(preset.config("text_encoder"), feed_forward_proj="gated-gelu")


def network_config(preset: Preset, network: str) -> dict:
    """Constructor arguments of one of a preset's networks (:data:`~hallo3_cli.components.NETWORKS`): a random
    preset's from models.toml; a model folder's from its components' config.json; the release's are the classes'
    defaults (tests check them against the official checkpoint manifest), diffusers' CogVideoX VAE defaults, T5-XXL
    and wav2vec2-base."""
    if preset.is_folder:
        return _folder_config(preset, network)
    if network in ("transformer", "reference"):
        return transformer_config(preset, main=network == "transformer")
    if network == "vae":
        return vae_config(preset)
    if network == "text_encoder":
        return text_encoder_config(preset)
    if network == "wav2vec":
        return preset.config("wav2vec")
    raise ValueError(f"unknown network {network!r}; known: {', '.join(NETWORKS)}")


def transformer_arguments(preset: Preset, *, main: bool = True) -> dict:
    """Every constructor argument of a preset's DiT, the class defaults included (the geometry that the cost
    model, the stage-file checks and the parallel split read)."""
    import inspect

    from hallo3_cli.models import Hallo3ReferenceNet, Hallo3Transformer3DModel

    cls = Hallo3Transformer3DModel if main else Hallo3ReferenceNet
    defaults = {name: p.default for name, p in inspect.signature(cls.__init__).parameters.items()
                if p.default is not inspect.Parameter.empty}
    return {**defaults, **network_config(preset, "transformer" if main else "reference")}


def network_widths(preset: Preset) -> dict[str, int]:
    """The widths a preset's stage files carry: DiT layers and width, patch size, text-encoder width, wav2vec
    layers and width. Random presets: models.toml; the release: the installed components' config.json where
    present, else the release's architecture."""
    dit = transformer_arguments(preset)
    if not preset.is_random and not preset.is_folder:
        dit.update(_installed_config(preset, "transformer"))
    return {"dit_layers": dit["num_layers"], "dit_width": dit["num_attention_heads"] * dit["attention_head_dim"],
            "patch": dit["patch_size"], "text_width": dit["text_embed_dim"], "audio_layers": dit["audio_layers"],
            "audio_width": dit["audio_channels"]}


#: config.json entries that are bookkeeping, not constructor arguments.
_NOT_ARGUMENTS = ("_class_name", "_diffusers_version", "_name_or_path", "architectures", "model_type",
                  "transformers_version", "torch_dtype", "dtype", "is_encoder_decoder", "use_cache")


def _folder_config(preset: Preset, network: str) -> dict:
    from hallo3_cli.components import of_network

    config = _installed_config(preset, of_network(network).folder)
    return {key: value for key, value in config.items() if key not in _NOT_ARGUMENTS}


def _installed_config(preset: Preset, component: str) -> dict:
    try:
        with open(os.path.join(preset.component_dir(component), "config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def build_network(network: str, config: dict) -> torch.nn.Module:
    """A network of :data:`~hallo3_cli.components.NETWORKS` built from its config (weights as the classes
    initialise them)."""
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


def random_network(preset: Preset, network: str) -> torch.nn.Module:
    """A random preset's network: built at its configuration and filled from the preset's seed (each network
    with its own salt), in evaluation mode without gradients."""
    module = build_network(network, network_config(preset, network))
    fill_random_(module, random_seed(preset.seed, network), std=0.02)
    return module.eval().requires_grad_(False)


def default_feature_extractor():
    """wav2vec2-base-960h's feature-extractor settings (16 kHz, zero-mean unit-variance normalisation)."""
    from transformers import Wav2Vec2FeatureExtractor

    from hallo3_cli.audio_io import SAMPLE_RATE

    return Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=SAMPLE_RATE, padding_value=0.0, do_normalize=True,
                                    return_attention_mask=False)


def fill_random_(module, seed: int, std: float = 0.02) -> None:
    """Overwrite every parameter and persistent buffer of ``module`` with seeded random values.

    Each tensor gets its own generator seeded from ``seed`` and its name, so the values do not
    depend on library initialisation code or on module construction order. Norm weights are drawn
    around 1, everything else around 0.
    """
    import torch

    state = module.state_dict(keep_vars=True)
    with torch.no_grad():
        for name, tensor in state.items():
            if not tensor.is_floating_point():
                continue
            generator = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
            values = torch.randn(tensor.shape, generator=generator, dtype=torch.float32) * std
            leaf = name.rsplit(".", 2)
            if leaf[-1] == "weight" and tensor.ndim == 1 and "norm" in name.lower():
                values += 1.0
            tensor.copy_(values.to(tensor.dtype))


def random_tokenizer(preset: Preset):
    """A random preset's tokenizer (:class:`~hallo3_cli.models.tokenization_hashed.HashedWordTokenizer`)."""
    from hallo3_cli.models.tokenization_hashed import HashedWordTokenizer

    return HashedWordTokenizer(vocab_size=preset.config("text_encoder")["vocab_size"])


#: Networks that are stacks of transformer blocks: layerwise casting (fp8 storage) and group offloading act on
#: them; the value names the submodules holding their block lists for diffusers' group offloading (none: the
#: direct ModuleList children; T5 keeps its blocks in ``encoder.block``).
BLOCK_NETWORKS: dict[str, tuple[str, ...]] = {"transformer": (), "reference": (), "text_encoder": ("encoder",)}
