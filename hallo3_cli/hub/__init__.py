"""The weights: fetched from the Hugging Face Hub or imported from an official folder, converted, verified and
installed into the model home (``hallo3 download``, ``hallo3 convert``), and the check every command makes
before it loads any (:func:`ensure_weights`).

- :mod:`.sources`: what a release preset is made of (``models.toml``);
- :mod:`.fetch`: the Hub (exact sizes, resumable downloads, one-line failures);
- :mod:`.official`: an official ``pretrained_models/`` folder (``--from``);
- :mod:`.convert`: the official SAT/DeepSpeed DiT checkpoint → diffusers folders;
- :mod:`.install`: build, verify, mark complete, rename into place; disk space and the lock;
- :mod:`.verify`: header-only integrity checks;
- :mod:`.download`: ``download()``, ``ensure_weights()`` and the model home's ``model_index.json``.

What counts as installed is :mod:`hallo3_cli.store`'s to say (markers, fingerprints).
"""

from hallo3_cli.hub.convert import convert_checkpoint, load_official_state_dict
from hallo3_cli.hub.download import download, ensure_weights, write_model_index
from hallo3_cli.hub.fetch import pending_downloads
from hallo3_cli.hub.report import ComponentReport, DownloadReport, format_report
from hallo3_cli.hub.sources import Source, component_names, sources
from hallo3_cli.hub.verify import read_safetensors_shapes, verify_converted, verify_files, verify_folder

__all__ = ["ComponentReport", "DownloadReport", "Source", "component_names", "convert_checkpoint", "download",
           "ensure_weights", "format_report", "load_official_state_dict", "pending_downloads", "read_safetensors_shapes",
           "sources", "verify_converted", "verify_files", "verify_folder", "write_model_index"]
