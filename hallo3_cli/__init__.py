"""hallo3-cli: the Hallo3 audio-driven portrait animation model as a command-line tool.

The public Python API is small and lazily imported so that ``hallo3 --help`` stays fast:

    from hallo3_cli import render_video, embed_audio_file, encode_reference, render_clips, stitch
"""

__version__ = "0.1.0"

_LAZY = {
    "embed_audio_file": "hallo3_cli.audio",
    "encode_reference": "hallo3_cli.pipeline",
    "render_clips": "hallo3_cli.pipeline",
    "render_video": "hallo3_cli.pipeline",
    "stitch": "hallo3_cli.pipeline",
    "VideoRenderer": "hallo3_cli.pipeline",
    "load_audio": "hallo3_cli.audio_io",
    "load_image": "hallo3_cli.image_io",
}


def __getattr__(name):  # PEP 562: import heavy modules only when used
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'hallo3_cli' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
