"""The Hallo3 networks as diffusers models."""

from hallo3_cli.models.projections import AudioProjModel, FaceProjModel
from hallo3_cli.models.reference_hallo3 import Hallo3ReferenceNet
from hallo3_cli.models.transformer_hallo3 import Hallo3Transformer3DModel

__all__ = ["AudioProjModel", "FaceProjModel", "Hallo3ReferenceNet", "Hallo3Transformer3DModel"]
