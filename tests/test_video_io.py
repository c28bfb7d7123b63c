"""Video decoding with PyAV and Qwen2-VL's frame sampling (against transformers' rule)."""
from __future__ import annotations

import io

import numpy as np
import pytest

from mistralpy.multimodal.inputs import MediaError
from mistralpy.multimodal.video_io import decode_video, sample_indices


def _mp4(n: int, fps: int = 10, w: int = 64, h: int = 48, codec: str = "mpeg4") -> tuple[bytes, list[np.ndarray]]:
    import av

    buf = io.BytesIO()
    frames = []
    with av.open(buf, mode="w", format="mp4") as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for i in range(n):
            img = np.zeros((h, w, 3), dtype=np.uint8)
            img[:, :, 0] = (i * 20) % 256          # each frame its own red level (survives compression)
            img[: h // 2, :, 1] = 200
            frames.append(img)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue(), frames


@pytest.mark.parametrize("total,video_fps,fps,max_frames", [(100, 25.0, 2.0, 32), (30, 10.0, 2.0, 32),
                                                            (600, 30.0, 2.0, 32), (7, 10.0, 2.0, 32),
                                                            (50, 10.0, 1.0, 8), (3, 10.0, 2.0, 32)])
def test_sampling_equals_transformers(total, video_fps, fps, max_frames):
    torch = pytest.importorskip("torch")
    from transformers.video_utils import VideoMetadata

    try:
        from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor
    except ImportError:  # needs torchvision
        pytest.skip("transformers' Qwen2-VL video processor needs torchvision")
    proc = Qwen2VLVideoProcessor(max_frames=max_frames)
    meta = VideoMetadata(total_num_frames=total, fps=video_fps, duration=total / video_fps)
    try:
        want = proc.sample_frames(meta, fps=fps).tolist()
    except ValueError:
        want = None
    got = sample_indices(total, video_fps, fps, max_frames=max_frames)
    assert want is None or got == want
    del torch


def test_sampling_rule():
    assert sample_indices(100, 25.0, 2.0) == [0, 12, 25, 37, 50, 62, 75, 87]   # 4 s at 2 fps = 8 frames
    assert len(sample_indices(6000, 30.0, 2.0)) == 32                          # capped at 32
    assert sample_indices(30, 10.0, 2.0) == [0, 5, 10, 15, 20, 25]              # 3 s at 2 fps
    assert sample_indices(12, 10.0, 2.0) == [0, 3, 6, 9]                       # 2.4 frames -> min_frames 4
    assert sample_indices(3, 10.0, 2.0) == [0, 1]                              # rounded down to the patch


def test_decode_and_sample_an_mp4():
    data, frames = _mp4(40, fps=10)
    video = decode_video(data, fps=2.0)
    assert video.total_frames == 40 and video.source_fps == pytest.approx(10.0)
    idx = sample_indices(40, 10.0, 2.0)
    assert len(video.frames) == len(idx) == 8 and video.fps == pytest.approx(2.0)
    for im, i in zip(video.frames, idx):
        arr = np.asarray(im)
        assert im.size == (64, 48) and im.mode == "RGB"
        assert abs(float(arr[30:, :, 0].mean()) - frames[i][30:, :, 0].mean()) < 12   # the right frame


def test_bad_inputs():
    with pytest.raises(MediaError, match="not a video"):
        decode_video(b"definitely not a video file")
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    still = decode_video(buf.getvalue())   # FFmpeg reads a still image as a one-frame clip
    assert len(still.frames) == 1 and still.frames[0].size == (8, 8)
