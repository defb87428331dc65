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

from hallo3_cli import geometry, options, store
from hallo3_cli.errors import Hallo3Error, ModelError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

MODELS_TOML = Path(__file__).with_name("models.toml")
TINY_RANDOM = "tiny-random"


@dataclass(frozen=True)
class Preset:
    """One model preset: geometry, defaults and components (video geometry and settings the table leaves out are
    the release's: :data:`hallo3_cli.geometry.RELEASE`, :data:`hallo3_cli.options.RELEASE`)."""

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
        return int(self.table.get("height", geometry.RELEASE["height"]))

    @property
    def width(self) -> int:
        return int(self.table.get("width", geometry.RELEASE["width"]))

    @property
    def fps(self) -> int:
        return int(self.table.get("fps", geometry.RELEASE["fps"]))

    @property
    def clip_length(self) -> int:
        return int(self.table.get("clip_length", geometry.RELEASE["clip_length"]))

    @property
    def motion_frames(self) -> int:
        return int(self.table.get("motion_frames", geometry.RELEASE["motion_frames"]))

    @property
    def steps(self) -> int:
        return int(self.table.get("steps", options.RELEASE["steps"]))

    @property
    def cfg(self) -> float:
        return float(self.table.get("cfg", options.RELEASE["cfg"]))

    @property
    def vae_scale(self) -> float:
        return float(self.table["vae_scale"])

    @property
    def text_length(self) -> int:
        return int(self.table.get("text_length", geometry.RELEASE["text_length"]))

    @property
    def default_prompt(self) -> str:
        return str(self.table.get("default_prompt", options.RELEASE["default_prompt"]))

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
    def is_folder(self) -> bool:
        """A model folder given by path (a pipeline saved with ``save_pretrained``, e.g. what ``hallo3 train``
        exports), not a preset of ``models.toml``."""
        return "folder" in self.table

    @property
    def slug(self) -> str:
        """A name for this preset in file names: the preset's name, or for a model folder its base name and a short
        hash of its path."""
        if not self.is_folder:
            return self.name
        import re

        return f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', Path(self.name).name)[:40]}-{hashlib.sha256(self.name.encode()).hexdigest()[:8]}"

    @property
    def home(self) -> Path:
        """Folder holding this preset's components."""
        return Path(self.table["folder"]) if self.is_folder else model_home() / self.name

    def component_dir(self, component: str) -> Path:
        """Local folder of a component (``transformer``, ``vae``, ``wav2vec``...). A model folder is laid out by
        the pipeline's component names (``reference_net``, ``audio_encoder``...)."""
        if self.is_folder:
            from hallo3_cli.components import COMPONENTS

            component = next((c.name for c in COMPONENTS if c.folder == component and c.network), component)
        return self.home / component

    def is_installed(self, component: str) -> bool:
        """The one meaning of "installed": the folder's ``.complete`` marker lists files that are all there
        with their sizes (:func:`hallo3_cli.store.component_state`). A model folder's components are there or not."""
        if self.is_folder:
            return self.component_dir(component).is_dir()
        return not self.is_random and store.is_installed(self.home, component)

    def require(self, component: str) -> Path:
        """The component's folder, or a ModelError telling the user how to get it."""
        if self.is_random:
            raise Hallo3Error(f"preset {self.name!r} has no files; its {component} is generated in memory")
        if self.is_folder:
            if not self.is_installed(component):
                raise ModelError(f"the model folder has no {self.component_dir(component).name}/ ({component} weights)",
                                 self.home)
            return self.component_dir(component)
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


#: A model folder's ``model_index.json`` keys → the preset table's.
_FOLDER_KEYS = {"height": "height", "width": "width", "clip_length": "clip_length", "motion_frames": "motion_frames",
                "fps": "fps", "text_length": "text_length", "default_steps": "steps", "default_guidance_scale": "cfg",
                "default_prompt": "default_prompt"}


def is_model_folder(name: str | os.PathLike) -> bool:
    """Whether ``name`` is a folder holding a pipeline's ``model_index.json``."""
    return (Path(name).expanduser() / "model_index.json").is_file()


def folder_preset(folder: str | os.PathLike) -> Preset:
    """A model folder (``model_index.json`` + one subfolder per component, as ``save_pretrained`` writes it) as a
    preset named by its absolute path: its geometry and settings from ``model_index.json``, the VAE scale from the
    VAE's config. Nothing is downloaded for it: its components are there or not."""
    folder = Path(folder).expanduser().resolve()
    try:
        index = json.loads((folder / "model_index.json").read_text())
        vae = json.loads((folder / "vae" / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise ModelError(f"not a readable model folder ({err})", folder) from None
    if not isinstance(index, dict) or not isinstance(vae, dict):
        raise ModelError("not a model folder (model_index.json and vae/config.json must be JSON objects)", folder)
    table = {key: index[source] for source, key in _FOLDER_KEYS.items() if source in index}
    table.update(folder=str(folder), vae_scale=vae.get("scaling_factor", 0.7),
                 description=f"model folder {folder}")
    return Preset(str(folder), table)


def get_preset(name: str) -> Preset:
    """Look up a preset by name, or a model folder by path; unknown names raise a one-line error listing the
    known ones."""
    presets = _all_presets()
    if name in presets:
        return Preset(name, presets[name])
    if is_model_folder(name):
        return folder_preset(name)
    raise Hallo3Error(f"unknown model preset {name!r}; known presets: {', '.join(presets)} (or a model folder "
                      "with a model_index.json)")
