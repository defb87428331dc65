"""Model presets (``models.toml``): where each component lives, its geometry, and fingerprints.

A preset is either the real release (``hallo3``: components on disk under the model home) or
``tiny-random`` (same architecture, tiny widths, weights generated from a seed in memory).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from hallo3_cli import store
from hallo3_cli.errors import Hallo3Error, ModelError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

MODELS_TOML = Path(__file__).with_name("models.toml")
TINY_RANDOM = "tiny-random"


@dataclass(frozen=True)
class Preset:
    """One model preset: geometry, defaults and components."""

    name: str
    table: dict[str, Any] = field(repr=False)

    # geometry and defaults -------------------------------------------------------------------
    @property
    def is_random(self) -> bool:
        return "seed" in self.table

    @property
    def seed(self) -> int:
        return int(self.table.get("seed", 0))

    @property
    def height(self) -> int:
        return int(self.table["height"])

    @property
    def width(self) -> int:
        return int(self.table["width"])

    @property
    def fps(self) -> int:
        return int(self.table["fps"])

    @property
    def clip_length(self) -> int:
        return int(self.table["clip_length"])

    @property
    def motion_frames(self) -> int:
        return int(self.table["motion_frames"])

    @property
    def steps(self) -> int:
        return int(self.table["steps"])

    @property
    def cfg(self) -> float:
        return float(self.table["cfg"])

    @property
    def vae_scale(self) -> float:
        return float(self.table["vae_scale"])

    @property
    def text_length(self) -> int:
        return int(self.table["text_length"])

    @property
    def default_prompt(self) -> str:
        return str(self.table["default_prompt"])

    @property
    def description(self) -> str:
        return str(self.table.get("description", ""))

    def pipeline_config(self) -> dict[str, Any]:
        """The ``Hallo3Pipeline`` configuration of this preset (geometry and the release's defaults)."""
        return {"height": self.height, "width": self.width, "clip_length": self.clip_length,
                "motion_frames": self.motion_frames, "fps": self.fps, "text_length": self.text_length,
                "default_steps": self.steps, "default_guidance_scale": self.cfg, "default_prompt": self.default_prompt}

    def config(self, component: str) -> dict[str, Any]:
        """Architecture overrides of a random preset's component (empty for the release)."""
        return dict(self.table.get(component, {}))

    @property
    def components(self) -> dict[str, dict[str, Any]]:
        return dict(self.table.get("components", {}))

    # files -------------------------------------------------------------------------------------
    @property
    def home(self) -> Path:
        """Folder holding this preset's converted components."""
        return model_home() / self.name

    def component_dir(self, component: str) -> Path:
        """Local folder of a component (``transformer``, ``vae``, ``wav2vec``...)."""
        return self.home / component

    def is_installed(self, component: str) -> bool:
        """The one meaning of "installed": the folder's ``.complete`` marker lists files that are all there
        with their sizes (:func:`hallo3_cli.store.component_state`)."""
        return not self.is_random and store.is_installed(self.home, component)

    def require(self, component: str) -> Path:
        """The component's folder, or a ModelError telling the user how to get it."""
        if self.is_random:
            raise Hallo3Error(f"preset {self.name!r} has no files; its {component} is generated in memory")
        state = store.component_state(self.home, component)
        if state.state != "complete":
            detail = f" ({state.state}: {state.detail})" if state.detail else ""
            raise ModelError(
                f"the {component} weights of preset {self.name!r} are not installed in {state.path}{detail}; "
                f"run: hallo3 download --model {self.name}"
            )
        return state.path

    # fingerprints ------------------------------------------------------------------------------
    def fingerprint(self, *components: str) -> str:
        """A short, cheap fingerprint of the weights of ``components``.

        Random presets: hash of preset name, seed and component configs. Release: hash of each
        component's file names, sizes and the first and last MiB of every file (no full read).
        """
        digest = hashlib.sha256(self.name.encode())
        for component in sorted(components):
            digest.update(component.encode())
            if self.is_random:
                digest.update(str(self.seed).encode())
                digest.update(json.dumps(self.config(component), sort_keys=True).encode())
            else:
                digest.update(store.folder_fingerprint(self.require(component)).encode())
        return digest.hexdigest()[:16]


def model_home() -> Path:
    """``$HALLO3_HOME``, else ``<Hugging Face cache>/hallo3-cli``."""
    if os.environ.get("HALLO3_HOME"):
        return Path(os.environ["HALLO3_HOME"]).expanduser()
    hf_home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(hf_home).expanduser() / "hallo3-cli"


def _all_presets() -> dict[str, dict[str, Any]]:
    """The packaged presets, plus those of the TOML files listed in ``$HALLO3_PRESETS`` (``:``-separated;
    a table there adds a preset or replaces a packaged one of the same name)."""
    return _load_presets(os.environ.get("HALLO3_PRESETS", ""))


@lru_cache(maxsize=8)
def _load_presets(extra: str) -> dict[str, dict[str, Any]]:
    with open(MODELS_TOML, "rb") as f:
        presets = tomllib.load(f)
    from hallo3_cli.fsutil import require_file

    for name in filter(None, extra.split(os.pathsep)):
        try:
            require_file(name)  # a regular file: a fifo here would block every command
            with open(name, "rb") as f:
                presets.update(tomllib.load(f))
        except (OSError, tomllib.TOMLDecodeError, RecursionError, Hallo3Error) as err:
            raise Hallo3Error(f"{name}: cannot read presets from $HALLO3_PRESETS ({err})") from None
    return presets


def preset_names() -> list[str]:
    return list(_all_presets())


def get_preset(name: str) -> Preset:
    """Look up a preset by name; unknown names raise a one-line error listing the known ones."""
    presets = _all_presets()
    if name not in presets:
        raise Hallo3Error(f"unknown model preset {name!r}; known presets: {', '.join(presets)}")
    return Preset(name, presets[name])
