"""hallo3-cli: the Hallo3 audio-driven portrait animation model as a command-line tool.

The public Python API is small and lazily imported so that ``hallo3 --help`` stays fast:

    from hallo3_cli import Hallo3Pipeline, load_pipeline
    pipe = Hallo3Pipeline.from_pretrained("tiny-random")      # or load_pipeline("tiny-random", device="cpu")
    out = pipe(image="face.jpg", audio="speech.wav", seed=7)

and the commands' work, with stage files and caching: ``from hallo3_cli import render_video, embed_audio, ...``
"""

from hallo3_cli.version import __version__ as __version__

_LAZY = {
    # through loading: it teaches Hallo3Pipeline.from_pretrained the model presets
    "Hallo3Pipeline": "hallo3_cli.loading",
    "load_pipeline": "hallo3_cli.loading",
    "Hallo3PipelineOutput": "hallo3_cli.pipeline_hallo3",
    "Hallo3DPMSolverSDEScheduler": "hallo3_cli.scheduling_hallo3",
    "Hallo3Transformer3DModel": "hallo3_cli.models",
    "Hallo3ReferenceNet": "hallo3_cli.models",
    "Runtime": "hallo3_cli.runtime",
    "embed_audio": "hallo3_cli.jobs",
    "encode_reference": "hallo3_cli.jobs",
    "render_clips": "hallo3_cli.jobs",
    "render_video": "hallo3_cli.jobs",
    "stitch": "hallo3_cli.jobs",
    "VideoRenderer": "hallo3_cli.jobs",
    "load_audio": "hallo3_cli.audio_io",
    "load_image": "hallo3_cli.image_io",
}


def __getattr__(name):  # PEP 562: import heavy modules only when used
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'hallo3_cli' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
