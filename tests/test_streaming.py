"""`EMIM.stream()`: frame by frame, the same outputs as the whole-clip forward (float32, 1e-6 relative)."""

import pytest
import torch

from emim_triton import EMIM
from helpers import relative_error, switch_on_motion

B, H, W, C, HEADS = 2, 4, 3, 32, 2


def layer(direction, **kwargs) -> EMIM:
    torch.manual_seed(0)
    emim = EMIM(C, HEADS, window=3, direction=direction, backend="reference", **kwargs).eval()
    switch_on_motion(emim, std=0.2)
    return emim


def clip(T, seed=1):
    return torch.randn(B, T, H, W, C, generator=torch.Generator().manual_seed(seed))


def assert_same(got, expected):
    assert got is not None and got.shape == expected.shape
    assert relative_error(got, expected) <= 1e-6


@pytest.mark.parametrize("T", [1, 2, 4])
@pytest.mark.parametrize("dilation", [1, 2])
def test_prev_stream_returns_each_frame_at_once(T, dilation):
    emim, x = layer("prev", dilation=dilation), clip(T)
    with torch.no_grad():
        whole = emim(x)
        stream = emim.stream()
        for t in range(T):
            assert_same(stream(x[:, t]), whole[:, t])
        assert stream.flush() is None


@pytest.mark.parametrize("T", [1, 2, 4])
def test_next_stream_returns_the_previous_frame_and_flush_the_last(T):
    emim, x = layer("next", dilation=2, authors_context_channels=32), clip(T)
    with torch.no_grad():
        whole = emim(x)
        stream = emim.stream()
        assert stream(x[:, 0]) is None
        for t in range(1, T):
            assert_same(stream(x[:, t]), whole[:, t - 1])
        assert_same(stream.flush(), whole[:, T - 1])
        assert stream.flush() is None  # flush ended the stream


def test_token_frames_and_restart():
    """(B, H*W, C) frames with frames=(H, W) come back as tokens; after flush the stream starts anew."""
    emim, x = layer("prev"), clip(3)
    tokens = x.reshape(B, 3, H * W, C)
    with torch.no_grad():
        whole = emim(x).reshape(B, 3, H * W, C)
        stream = emim.stream()
        for _ in range(2):  # the second round checks that flush() forgot the first
            for t in range(3):
                assert_same(stream(tokens[:, t], frames=(H, W)), whole[:, t])
            stream.flush()


def test_a_stream_differs_from_restarting_every_frame():
    """The premise of the tests above: frame t's output does depend on the frame held from before."""
    emim, x = layer("prev"), clip(2)
    with torch.no_grad():
        stream = emim.stream()
        stream(x[:, 0])
        second = stream(x[:, 1])
        alone = emim.stream()(x[:, 1])
    assert relative_error(second, alone) > 1e-3


def test_stream_refuses_bad_frames_and_prefix_tokens():
    emim = layer("prev")
    stream = emim.stream()
    stream(torch.randn(B, H, W, C))
    with pytest.raises(ValueError, match=r"every frame of a stream must have one \(B, H, W\)"):
        stream(torch.randn(B, H + 1, W, C))
    with pytest.raises(ValueError, match=r"pass frames=\(H, W\)"):
        stream(torch.randn(B, H * W, C))
    with pytest.raises(ValueError, match="gives 6 tokens"):
        stream(torch.randn(B, H * W, C), frames=(2, 3))
    with pytest.raises(ValueError, match="expected dim = 32"):
        stream(torch.randn(B, H, W, C + 1))
    with pytest.raises(ValueError, match="a frame must be"):
        stream(torch.randn(B, 1, H, W, C))
    with pytest.raises(ValueError, match="prefix tokens attend to the whole clip"):
        EMIM(C, HEADS, num_prefix_tokens=1).stream()
