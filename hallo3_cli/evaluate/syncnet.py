"""SyncNet (Chung & Zisserman, "Out of time: automated lip sync in the wild", ACCV 2016 workshops).

Two towers embed 0.2 s of speech and of mouth motion into one space; matching pairs lie close.
The architecture is that of ``syncnet_v2`` as released with joonson/syncnet_python:

- audio: MFCC window (1, 13, 20) -> six 2D convolutions with BatchNorm/ReLU and three max-pools
  (1×1 identity, 3×3 with stride (1, 2), 3×3 with stride 2; the last convolution 5×4 without
  padding) -> a (channels, 1, 1) vector -> Linear, BatchNorm1d, ReLU, Linear -> embedding;
- lips: 5 frames of 224×224 BGR pixels, raw 0..255 (3, 5, 224, 224) -> a 5×7×7 3D convolution
  (stride 1, 2, 2) that consumes the 5 frames, then 2D-like (1, k, k) convolutions and pools down to
  (channels, 1, 1, 1) -> the same kind of head.

The layers sit in ``nn.Sequential`` containers at the positions the release's state dict uses, so
its tensors load by renaming four prefixes (:func:`convert_original_state_dict`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from hallo3_cli.components import random_seed
from hallo3_cli.errors import ModelError, reason as first_line

#: release prefix -> ours
ORIGINAL_PREFIXES = {
    "netcnnaud.": "audio_encoder.",
    "netfcaud.": "audio_head.",
    "netcnnlip.": "lip_encoder.",
    "netfclip.": "lip_head.",
}
#: prefixes that wrappers of the original network add to its keys
WRAPPER_PREFIXES = ("__S__.", "module.")

MFCC_WINDOW = 20  # MFCC columns (100 Hz) per window: 0.2 s
FRAMES_PER_WINDOW = 5  # video frames (25 fps) per window: 0.2 s
CROP_SIZE = 224


def _conv_block(conv: nn.Module, norm: nn.Module, pool: nn.Module | None = None) -> list[nn.Module]:
    return [conv, norm, nn.ReLU()] + ([pool] if pool is not None else [])


class SyncNetModel(ModelMixin, ConfigMixin):
    """SyncNet's audio and lip towers. Defaults are the widths of ``syncnet_v2``.

    ``audio_channels`` / ``lip_channels``: output widths of the six convolutions of each tower;
    ``hidden_dim``: width of the heads' middle layer; ``embedding_dim``: the shared space.
    """

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        audio_channels: Sequence[int] = (64, 192, 384, 256, 256, 512),
        lip_channels: Sequence[int] = (96, 256, 256, 256, 256, 512),
        hidden_dim: int = 512,
        embedding_dim: int = 1024,
    ):
        super().__init__()
        a, v = list(audio_channels), list(lip_channels)
        if len(a) != 6 or len(v) != 6:
            raise ValueError("audio_channels and lip_channels need 6 widths each")

        def conv2(cin, cout, kernel=(3, 3), padding=(1, 1)):
            return nn.Conv2d(cin, cout, kernel_size=kernel, stride=1, padding=padding)

        audio = []
        audio += _conv_block(conv2(1, a[0]), nn.BatchNorm2d(a[0]), nn.MaxPool2d(kernel_size=1, stride=1))
        audio += _conv_block(conv2(a[0], a[1]), nn.BatchNorm2d(a[1]), nn.MaxPool2d(kernel_size=3, stride=(1, 2)))
        audio += _conv_block(conv2(a[1], a[2]), nn.BatchNorm2d(a[2]))
        audio += _conv_block(conv2(a[2], a[3]), nn.BatchNorm2d(a[3]))
        audio += _conv_block(conv2(a[3], a[4]), nn.BatchNorm2d(a[4]), nn.MaxPool2d(kernel_size=3, stride=2))
        audio += _conv_block(conv2(a[4], a[5], kernel=(5, 4), padding=0), nn.BatchNorm2d(a[5]))
        self.audio_encoder = nn.Sequential(*audio)

        def conv3(cin, cout, kernel, stride=1, padding=(0, 1, 1)):
            return nn.Conv3d(cin, cout, kernel_size=kernel, stride=stride, padding=padding)

        def pool3(padding=0):
            return nn.MaxPool3d(kernel_size=(1, 3, 3), stride=(1, 2, 2), padding=padding)

        lips = []
        lips += _conv_block(conv3(3, v[0], (5, 7, 7), (1, 2, 2), 0), nn.BatchNorm3d(v[0]), pool3())
        lips += _conv_block(conv3(v[0], v[1], (1, 5, 5), (1, 2, 2)), nn.BatchNorm3d(v[1]), pool3((0, 1, 1)))
        lips += _conv_block(conv3(v[1], v[2], (1, 3, 3)), nn.BatchNorm3d(v[2]))
        lips += _conv_block(conv3(v[2], v[3], (1, 3, 3)), nn.BatchNorm3d(v[3]))
        lips += _conv_block(conv3(v[3], v[4], (1, 3, 3)), nn.BatchNorm3d(v[4]), pool3())
        lips += _conv_block(conv3(v[4], v[5], (1, 6, 6), 1, 0), nn.BatchNorm3d(v[5]))
        self.lip_encoder = nn.Sequential(*lips)

        def head(width):
            return nn.Sequential(
                nn.Linear(width, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, embedding_dim)
            )

        self.audio_head = head(a[5])
        self.lip_head = head(v[5])

    def forward_audio(self, mfcc: torch.Tensor) -> torch.Tensor:
        """(batch, 1, 13, 20) MFCC windows -> (batch, embedding_dim)."""
        return self.audio_head(self.audio_encoder(mfcc).flatten(1))

    def forward_lip(self, frames: torch.Tensor) -> torch.Tensor:
        """(batch, 3, 5, 224, 224) BGR pixel windows in 0..255 -> (batch, embedding_dim)."""
        return self.lip_head(self.lip_encoder(frames).flatten(1))

    def forward(self, mfcc: torch.Tensor, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.forward_audio(mfcc), self.forward_lip(frames)


def convert_original_state_dict(state: dict, model: SyncNetModel | None = None) -> dict[str, torch.Tensor]:
    """Rename the keys of a ``syncnet_v2`` state dict (``netcnnaud.0.weight``...) to ours.

    Keys may carry a wrapper prefix (``__S__.``, ``module.``). With ``model``, the key set and the
    shapes are checked against it (ModelError naming the first difference).
    """
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError("not a SyncNet state dict (expected a mapping of names to tensors)")
    renamed = {}
    for key, value in state.items():
        for prefix in WRAPPER_PREFIXES:
            key = key.removeprefix(prefix)
        for old, new in ORIGINAL_PREFIXES.items():
            if key.startswith(old):
                key = new + key[len(old):]
                break
        renamed[key] = value
    if model is not None:
        expected = model.state_dict()
        missing = sorted(set(expected) - set(renamed))
        unexpected = sorted(set(renamed) - set(expected))
        wrong = sorted(k for k in set(expected) & set(renamed) if tuple(expected[k].shape) != tuple(renamed[k].shape))
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if keys:
                raise ModelError(f"SyncNet weights do not match the architecture: {label} {', '.join(keys[:3])}")
    return renamed


def randomize_(model: SyncNetModel, seed: int, std: float = 0.02) -> SyncNetModel:
    """Seeded random weights (:func:`~hallo3_cli.networks.fill_random_`) with BatchNorm kept sane:
    scales around 1 and running variances 1 + |x| (a negative variance would give NaN)."""
    from hallo3_cli.networks import fill_random_

    fill_random_(model, seed, std=std)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.weight.add_(1.0)
                module.running_var.abs_().add_(1.0)
    return model


# ---------------------------------------------------------------------------------------------
# loading

SYNCNET_COMPONENT = "syncnet"
SYNCNET_FILE = "syncnet_v2.model"


def load_syncnet(preset, device="cpu") -> SyncNetModel:
    """The preset's SyncNet in eval mode.

    Random presets: the architecture at the widths of ``[<preset>.syncnet]`` in models.toml (the
    release's widths where the preset has no such table), seeded
    weights (:func:`randomize_`). The release: ``<model home>/<preset>/syncnet/syncnet_v2.model``,
    checked against the sha256 pinned in models.toml, then read with ``torch.load(weights_only=True)``
    (the file is a pickled state dict; only tensors and plain containers are admitted).
    """
    if preset.is_random:
        model = randomize_(SyncNetModel(**preset.config(SYNCNET_COMPONENT)), random_seed(preset.seed, SYNCNET_COMPONENT))
    else:
        from hallo3_cli.fsutil import sha256_file

        folder = preset.require(SYNCNET_COMPONENT)
        path = folder / SYNCNET_FILE
        if not path.is_file():
            raise ModelError(f"{SYNCNET_FILE} is missing; delete the folder and run: hallo3 download --model {preset.name}",
                             folder)
        expected = preset.components.get(SYNCNET_COMPONENT, {}).get("sha256", {}).get(SYNCNET_FILE)
        if expected and sha256_file(path) != expected:
            raise ModelError(f"checksum mismatch (sha256 is not the pinned {expected[:12]}...); delete {folder} "
                             f"and run: hallo3 download --model {preset.name}", path)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - unpickling errors come in many types
            reason = first_line(err)
            raise ModelError(f"cannot be loaded as plain tensors (weights_only): {reason[:200]}", path) from None
        model = SyncNetModel()
        model.load_state_dict(convert_original_state_dict(state, model))
    return model.to(device).eval().requires_grad_(False)
