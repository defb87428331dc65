"""The component vocabulary of a Hallo3 pipeline, in one place: each component's name in ``Hallo3Pipeline``,
the folder of a model home that holds it (= its ``models.toml`` name), the class ``model_index.json`` records
for it, and the network it is (the name :mod:`hallo3_cli.networks`, ``plan`` and the random presets use)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Component:
    name: str  # the Hallo3Pipeline attribute
    folder: str  # <model home>/<preset>/<folder>/
    library: str  # model_index.json: (library, class)
    class_name: str
    network: str | None = None  # a network of NETWORKS (None: tokenizer, feature extractor, scheduler)
    label: str = ""  # how messages and plans name it


COMPONENTS = (
    Component("transformer", "transformer", "hallo3_cli.models.transformer_hallo3", "Hallo3Transformer3DModel",
              "transformer", "DiT"),
    Component("reference_net", "reference", "hallo3_cli.models.reference_hallo3", "Hallo3ReferenceNet",
              "reference", "reference DiT"),
    Component("vae", "vae", "diffusers", "AutoencoderKLCogVideoX", "vae", "VAE"),
    Component("text_encoder", "text_encoder", "transformers", "T5EncoderModel", "text_encoder", "T5"),
    Component("tokenizer", "tokenizer", "transformers", "T5TokenizerFast"),
    Component("audio_encoder", "wav2vec", "transformers", "Wav2Vec2Model", "wav2vec", "wav2vec2"),
    Component("feature_extractor", "wav2vec", "transformers", "Wav2Vec2FeatureExtractor"),
    Component("scheduler", "scheduler", "hallo3_cli.scheduling_hallo3", "Hallo3DPMSolverSDEScheduler"),
)
#: The optional, non-module face models (SCRFD + ArcFace): a pipeline attribute and a model-home folder.
FACE_ANALYZER = "face_analyzer"
FACE_FOLDER = "face_analysis"
#: The networks, in the order a render first runs them.
NETWORKS = ("wav2vec", "vae", "text_encoder", "reference", "transformer")
#: Each random network gets its own weights from a random preset's seed: ``seed * 100 + salt`` (``hallo3 eval``'s
#: SyncNet: 6). wav2vec2 has always been filled from the seed itself (None); changing any of these would change
#: every random preset's renders.
_SALTS = {"transformer": 1, "reference": 2, "vae": 3, "text_encoder": 4, "wav2vec": None, "syncnet": 6}


def component(name: str) -> Component:
    """A component by its pipeline name."""
    for entry in COMPONENTS:
        if entry.name == name:
            return entry
    raise ValueError(f"unknown component {name!r}; known: {', '.join(c.name for c in COMPONENTS)}")


def of_network(network: str) -> Component:
    """The component that is ``network``."""
    for entry in COMPONENTS:
        if entry.network == network:
            return entry
    raise ValueError(f"unknown network {network!r}; known: {', '.join(NETWORKS)}")


def converted_class(folder: str) -> str | None:
    """The model class of a folder that ``hallo3 convert`` writes (the two DiTs), else None."""
    return next((c.class_name for c in COMPONENTS if c.folder == folder and c.library.startswith("hallo3_cli.models")),
                None)


def random_seed(seed: int, network: str) -> int:
    """The seed of a random preset's network, from the preset's ``seed``."""
    salt = _SALTS[network]
    return seed if salt is None else seed * 100 + salt
