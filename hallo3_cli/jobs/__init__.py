"""The commands' work on top of ``Hallo3Pipeline``: stage files, caching, resume, batches and sharding.

Each public function is one command (``embed-audio``, ``encode-ref``, ``render`` in its three forms,
``stitch``); the CLI only parses arguments and calls them::

    from hallo3_cli.jobs import render_video
    render_video("face.png", "speech.wav", "out.mp4", model="tiny-random")

- :mod:`.commands`: ``embed_audio``, ``encode_reference``, ``render_clips`` (stage files → clips file), ``stitch``;
- :mod:`.resume`: every finished clip persisted as it comes, and the same render resumed from them;
- :mod:`.video`: ``render_video`` / :class:`VideoRenderer` (face + speech → mp4, stage files cached);
- :mod:`.batch`: jobs files, sharded by rank under torchrun;
- :mod:`.parallel_session`: one video on the processes torchrun started (``--parallel video``).
"""

from hallo3_cli.jobs.batch import read_jobs, render_batch, shard
from hallo3_cli.jobs.commands import embed_audio, encode_reference, render_clips, stitch
from hallo3_cli.jobs.common import RenderSettings, require_weights
from hallo3_cli.jobs.resume import render_key, render_parts
from hallo3_cli.jobs.video import Job, VideoRenderer, render_video

__all__ = ["Job", "RenderSettings", "VideoRenderer", "embed_audio", "encode_reference", "read_jobs", "render_batch",
           "render_clips", "render_key", "render_parts", "render_video", "require_weights", "shard", "stitch"]
