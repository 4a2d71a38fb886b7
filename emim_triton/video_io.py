"""Reading a clip for a model (PyAV decoding, uniform sampling, resize and centre crop, normalisation) and
writing one (the synthetic demo clip of `emim-viz --make-demo-clip`, and the tests' videos)."""

from __future__ import annotations

import os

import numpy as np
import torch


def _av():
    try:
        import av
    except ImportError as error:  # an optional dependency: only the video tools need it
        raise ImportError("reading and writing video needs PyAV: pip install av (or emim-triton[viz])") from error
    return av


def sample_indices(num_available: int, num_frames: int) -> list[int]:
    """The middle frame of each of ``num_frames`` equal segments of the video (frames repeat when the video
    is shorter): the deterministic test-time sampling of segment-based video recognition."""
    return [min(int((i + 0.5) * num_available / num_frames), num_available - 1) for i in range(num_frames)]


def resize_and_crop(image: np.ndarray, size: int) -> np.ndarray:
    """Resize the short side of an (H, W, 3) uint8 image to ``size`` (bilinear), then crop the centre square."""
    from PIL import Image

    height, width = image.shape[:2]
    scale = size / min(height, width)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR))
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return resized[top:top + size, left:left + size]


def decode_video(path: str | os.PathLike) -> list[np.ndarray]:
    """All frames of the first video stream as (H, W, 3) uint8 RGB arrays; ValueError if it cannot be read."""
    av = _av()
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"cannot read video {path!r}: no such file")
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise ValueError(f"cannot read video {path!r}: it has no video stream")
            frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    except av.error.FFmpegError as error:
        raise ValueError(f"cannot read video {path!r}: FFmpeg says {error}") from error
    if not frames:
        raise ValueError(f"cannot read video {path!r}: no frame could be decoded")
    return frames


def read_clip(path, num_frames: int, size: int, mean=(0.45, 0.45, 0.45), std=(0.225, 0.225, 0.225)):
    """Decode ``num_frames`` frames sampled uniformly over the video, resized and centre-cropped to size.

    Returns (frames, clip): frames (T, size, size, 3) uint8 for display, and clip (1, 3, T, size, size)
    float32 normalised with mean and std (in 0..1 units), the input layout of the model zoo.
    """
    return clip_from_frames(decode_video(path), num_frames, size, mean, std)


def clip_from_frames(decoded: list[np.ndarray], num_frames: int, size: int, mean=(0.45, 0.45, 0.45),
                     std=(0.225, 0.225, 0.225)):
    """`read_clip` from already decoded (H, W, 3) uint8 frames. A video shorter than ``num_frames`` is
    refused: repeated frames would show motion that stops and jumps, which the video does not have."""
    if not 1 <= num_frames <= len(decoded):
        raise ValueError(f"cannot sample {num_frames} frames from a video of {len(decoded)}: expected 1 to "
                         f"{len(decoded)}")
    if size < 1:
        raise ValueError(f"the frame size must be >= 1, got {size}")
    frames = np.stack([resize_and_crop(decoded[i], size) for i in sample_indices(len(decoded), num_frames)])
    clip = torch.from_numpy(frames).float().div_(255).permute(3, 0, 1, 2)  # (3, T, H, W)
    clip = (clip - torch.tensor(mean).view(3, 1, 1, 1)) / torch.tensor(std).view(3, 1, 1, 1)
    return frames, clip.unsqueeze(0)


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: int = 8, crf: int | None = None,
                realtime: bool = False) -> None:
    """Encode (T, H, W, 3) uint8 RGB frames (H, W even): VP9 for .webm, H.264 otherwise, nearly lossless.
    ValueError if ``path`` cannot take such a video (no such directory, a container without H.264, ...).

    crf: the encoder's constant rate factor, lower is closer to lossless (default: 10 for VP9, 12 for
    H.264: high quality, so that texture, what motion is seen in, survives the compression).
    realtime: VP9's fastest preset, for writing many clips (a generated dataset, the tests' videos).
    """
    av = _av()
    path = os.fspath(path)
    webm = path.lower().endswith(".webm")
    formats = "an .mp4, .mkv, .mov, .avi or .webm file"
    try:
        container = av.open(path, "w")
    except OSError as error:  # PyAV's errors (no such directory, permission denied) are OSErrors
        raise ValueError(f"cannot write video {path!r}: {error}") from error
    except ValueError as error:  # FFmpeg knows no container by this extension
        raise ValueError(f"cannot write video {path!r}: {error}; expected {formats}") from error
    with container:
        try:
            stream = container.add_stream("libvpx-vp9" if webm else "libx264", rate=fps)
        except ValueError as error:  # a container without the codec, e.g. .gif
            raise ValueError(f"cannot write video {path!r}: {error}; expected {formats}") from error
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        if webm:  # "b:v 0": quality from crf alone, no bitrate target
            stream.options = {"crf": str(10 if crf is None else crf), "b:v": "0",
                              **({"deadline": "realtime", "cpu-used": "8"} if realtime else {})}
        else:
            stream.options = {"crf": str(12 if crf is None else crf)}
        for image in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")))
        container.mux(stream.encode(None))  # flush the encoder


def translating_square(num_frames: int = 16, size: int = 64, step=(1, 2), seed: int = 0) -> np.ndarray:
    """(T, size, size, 3) uint8: a randomly textured square moving by ``step`` = (dy, dx) pixels per frame
    over a still, dimmer texture, centred on its path so that it stays inside the frame."""
    rng = np.random.default_rng(seed)

    def texture(height, width, low, high):  # 4 x 4 pixel blocks: coarse enough to survive compression
        blocks = rng.integers(low, high, size=(height // 4 + 1, width // 4 + 1, 3), dtype=np.uint8)
        return blocks.repeat(4, axis=0).repeat(4, axis=1)[:height, :width]

    background = texture(size, size, 20, 90)
    side = size // 3
    square = texture(side, side, 60, 256)
    frames = np.repeat(background[None], num_frames, axis=0)
    start = [size / 2 - side / 2 - s * (num_frames - 1) / 2 for s in step]
    for t in range(num_frames):
        y, x = (int(round(p + s * t)) for p, s in zip(start, step))
        y0, x0, y1, x1 = max(y, 0), max(x, 0), min(y + side, size), min(x + side, size)
        frames[t, y0:y1, x0:x1] = square[y0 - y:y1 - y, x0 - x:x1 - x]
    return frames


def write_demo_clip(path: str | os.PathLike, num_frames: int = 16, size: int = 64, step=(1, 2)) -> None:
    """The demo clip of `emim-viz --make-demo-clip`: `translating_square` encoded to ``path``."""
    write_video(path, translating_square(num_frames, size, step))
