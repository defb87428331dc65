"""The video geometry Hallo3 works in, in one place: latent sizes, clips and the frames each clip adds.

The CogVideoX VAE compresses 4 frames into one latent frame (causally: the first frame alone, so 49 frames
give 13) and 8×8 pixels into one latent pixel of 16 channels. A video is made of clips of ``clip_length``
frames whose first ``motion_frames`` continue the previous clip (docs/model.md §7).
"""

from __future__ import annotations

import math

#: The release's video (docs/model.md §7): 480×720 frames, clips of 49 frames whose first 2 continue the previous
#: clip, 25 fps, 226 text tokens. The ``hallo3`` preset and the pipeline's defaults are these.
RELEASE = {"height": 480, "width": 720, "clip_length": 49, "motion_frames": 2, "fps": 25, "text_length": 226}

LATENT_CHANNELS = 16
TEMPORAL_COMPRESSION = 4
SPATIAL_COMPRESSION = 8


def latent_frames(frames: int) -> int:
    """Latent frames of ``frames`` video frames (49 → 13)."""
    return (frames - 1) // TEMPORAL_COMPRESSION + 1


def latent_size(height: int, width: int) -> tuple[int, int]:
    """Latent ``(height, width)`` of a frame (480×720 → 60×90)."""
    return height // SPATIAL_COMPRESSION, width // SPATIAL_COMPRESSION


def num_clips(num_frames: int, clip_length: int, motion_frames: int) -> int:
    """Clips needed to cover ``num_frames`` video frames (docs/model.md §7.2).

    The official code renders ``ceil(padded / 47)`` clips and trims the video afterwards; clips past the
    unpadded length only produce frames that are cut, so they are not rendered.
    """
    return math.ceil(num_frames / (clip_length - motion_frames))


def new_frames(frames, motion_frames: int, remaining: int):
    """The frames a clip adds to the video, trimmed to the ``remaining`` frames of the speech: the clip's
    frames after its motion frames (any sliceable sequence, first axis)."""
    return frames[motion_frames:][:max(remaining, 0)]
