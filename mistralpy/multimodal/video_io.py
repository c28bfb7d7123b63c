"""Video decoding (PyAV) and frame sampling for the video-capable families (Qwen-VL).

``decode_video`` reads every frame's timestamp-ordered pixels from an in-memory file (mp4, webm,
mkv, avi, mov, gif: whatever the bundled FFmpeg demuxes), refusing non-videos, streams without a
video track and frame sizes or durations over the caps before decoding everything. Frames are
then sampled with Qwen2-VL's rule (transformers' video processor): ``total / video_fps * fps``
frames, clamped to [min_frames, max_frames] and to the frame count, rounded down to a multiple of
the temporal patch size, at indices ``arange(0, total, total / n)``. ``max_frames`` defaults to 32
(the engine's cap per video).
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from mistralpy.multimodal.inputs import MediaError

MAX_FRAMES = 32
MAX_DECODED_FRAMES = 4096          # frames read before sampling (a 2 min clip at 30 fps)
MAX_FRAME_PIXELS = 8_300_000       # 4K


@dataclass(slots=True)
class Video:
    frames: list[Image.Image]      # the sampled frames, RGB
    fps: float                     # rate of the sampled frames (what the processor's timing uses)
    source_fps: float
    total_frames: int


def sample_indices(total: int, video_fps: float, fps: float = 2.0, min_frames: int = 4,
                   max_frames: int = MAX_FRAMES, temporal_patch_size: int = 2) -> list[int]:
    """Qwen2-VL's frame sampling (transformers' Qwen2VLVideoProcessor.sample_frames with ``fps``)."""
    if total <= 0:
        raise MediaError("the video has no frames", "videos")
    cap = math.floor(min(max_frames, total) / temporal_patch_size) * temporal_patch_size
    n = min(max(total / video_fps * fps, min_frames), cap, total)
    n = math.floor(n / temporal_patch_size) * temporal_patch_size
    if n <= 0:   # shorter than one temporal patch: every frame (the processor pads to the patch)
        return list(range(total))
    step = total / n
    return [int(i * step) for i in range(n)]


def decode_video(data: bytes, fps: float = 2.0, max_frames: int = MAX_FRAMES,
                 temporal_patch_size: int = 2) -> Video:
    """Decode ``data`` and sample its frames (see the module docstring)."""
    try:
        import av
    except ImportError as exc:  # a dependency; only a broken install lacks it
        raise MediaError("video input needs PyAV (pip install av)", "videos") from exc
    try:
        container = av.open(io.BytesIO(data), mode="r")
    except (av.error.InvalidDataError, av.error.FFmpegError, ValueError) as exc:
        raise MediaError(f"not a video ({exc.__class__.__name__})", "videos") from None
    with container:
        if not container.streams.video:
            raise MediaError("the file has no video stream", "videos")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        width, height = stream.codec_context.width, stream.codec_context.height
        if width * height > MAX_FRAME_PIXELS:
            raise MediaError(f"video frames of {width}x{height} exceed the {MAX_FRAME_PIXELS}-pixel cap", "videos")
        rate = float(stream.average_rate or stream.guessed_rate or 0) or 24.0
        frames: list[np.ndarray] = []
        try:
            for frame in container.decode(stream):
                if len(frames) >= MAX_DECODED_FRAMES:
                    raise MediaError(f"the video is longer than {MAX_DECODED_FRAMES} frames", "videos")
                frames.append(frame.to_ndarray(format="rgb24"))
        except av.error.FFmpegError as exc:
            if not frames:
                raise MediaError(f"the video cannot be decoded ({exc.__class__.__name__})", "videos") from None
    if not frames:
        raise MediaError("the video has no frames", "videos")
    idx = sample_indices(len(frames), rate, fps, max_frames=max_frames, temporal_patch_size=temporal_patch_size)
    sampled_fps = rate * len(idx) / len(frames)
    return Video([Image.fromarray(frames[i]) for i in idx], sampled_fps, rate, len(frames))
