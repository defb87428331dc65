"""hallo3-cli: the Hallo3 audio-driven portrait animation model as a command-line tool.

The public Python API is small and lazily imported so that ``hallo3 --help`` stays fast:

    from hallo3_cli import embed_audio, encode_reference, render
"""

__version__ = "0.1.0"

_LAZY = {
    "embed_audio": "hallo3_cli.audio",
    "load_audio": "hallo3_cli.media",
    "load_image": "hallo3_cli.media",
}


def __getattr__(name):  # PEP 562: import heavy modules only when used
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'hallo3_cli' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
