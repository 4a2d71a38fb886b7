"""Motion fields from EMIM's attention (`emim_triton.viz`) and the `emim-viz` command.

The fields are checked where the answer is known: tokens of a texture translating by (dy, dx) per frame,
seen by an EMIM layer whose q and k projections are (scaled) identities, must give (dy, dx); a position
bias peaked on one window entry must give that entry's displacement. The command runs on a video it writes
itself, with the reference backend (the Triton interpreter would be slow).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from emim_triton import EMIM
from emim_triton.convert import GridEMIM
from emim_triton.models import create_model
from emim_triton.video_io import translating_square, write_video
from emim_triton.motion_field import motion_fields, window_displacements
from emim_triton.viz import main
from emim_triton.viz_draw import colour_wheel, flow_to_rgb

pytest.importorskip("av")


class Wrapper(nn.Module):
    """A model around one attention layer, called on (B, T, H, W, C) video tokens."""

    def __init__(self, attn: nn.Module):
        super().__init__()
        self.attn = attn

    def forward(self, video):
        return self.attn(video)


def identity_qk_emim(channels=32, heads=2, window=5, sharpness=40.0) -> EMIM:
    """EMIM with q = g * x, k = x, v = x (g chosen so that a perfect match has affinity ``sharpness``) and
    no position bias: its attention looks for each token's features in the next frame."""
    emim = EMIM(channels, heads, window=window, backend="reference")
    head_dim = channels // heads
    gain = sharpness / (emim.scale * head_dim ** 0.5)  # features of norm sqrt(head_dim) per head, see below
    eye = torch.eye(channels)
    with torch.no_grad():
        emim.qkv.weight.copy_(torch.cat([gain * eye, eye, eye]))
        emim.qkv.bias.zero_()
        emim.rpb.zero_()
    return emim


def translating_tokens(step, frames=4, height=9, width=10, channels=32, heads=2, seed=0):
    """(1, T, H, W, C) tokens of a random feature texture that moves by step = (dy, dx) tokens per frame:
    token (t, y, x) = texture(y - t*dy, x - t*dx). Each head's features are normalised to a norm of
    sqrt(head_dim), so only a perfect match reaches the largest affinity."""
    dy, dx = step
    margin = frames * max(abs(dy), abs(dx))
    texture = torch.randn(height + 2 * margin, width + 2 * margin, heads, channels // heads,
                          generator=torch.Generator().manual_seed(seed))
    texture = texture / texture.norm(dim=-1, keepdim=True) * (channels // heads) ** 0.5
    video = torch.stack([texture[margin - t * dy:margin - t * dy + height, margin - t * dx:margin - t * dx + width]
                         for t in range(frames)])
    return video.reshape(1, frames, height, width, channels)


@pytest.mark.parametrize("step", [(1, -2), (0, 1), (-1, 0), (2, 2)])
def test_expected_displacement_recovers_a_known_translation(step):
    model = Wrapper(identity_qk_emim())
    video = translating_tokens(step)
    field = motion_fields(model, video)["attn"]

    B, T, H, W, C = video.shape
    assert field.grid == (T, H, W)
    assert field.displacement.shape == (1, T - 1, H, W, 2, 2) and field.mean_confidence.shape == (1, T - 1, H, W)
    # Where the token's next position is inside the frame, the window holds its match: exactly one entry.
    dy, dx = step
    inside = (slice(None), slice(None), slice(max(0, -dy), H - max(0, dy)), slice(max(0, -dx), W - max(0, dx)))
    expected = torch.tensor([float(dy), float(dx)])
    assert torch.allclose(field.mean_displacement[inside], expected.expand_as(field.mean_displacement[inside]),
                          atol=1e-3)
    assert torch.equal(field.peak[inside], expected.expand_as(field.peak[inside]))
    assert field.mean_confidence[inside].min() > 0.99


def test_position_bias_peaks_give_their_displacements_and_the_heads_mixture():
    """With q = 0 the window's probabilities come from rpb alone: a peak at window entry (i, j) means
    displacement (i - r, j - r) (rows are dy, columns dx); two heads peaked on different entries average."""
    emim = EMIM(32, 2, window=3, backend="reference")
    with torch.no_grad():
        emim.qkv.weight.zero_()
        emim.qkv.bias.zero_()
        emim.rpb.zero_()
        emim.rpb[0, 2, 1] = 100.0  # head 0: dy = +1, dx = 0
        emim.rpb[1, 1, 0] = 100.0  # head 1: dy = 0,  dx = -1
    field = motion_fields(Wrapper(emim), torch.randn(1, 3, 4, 5, 32))["attn"]

    assert torch.allclose(field.displacement[..., 0, :], torch.tensor([1.0, 0.0]).expand(1, 2, 4, 5, 2))
    assert torch.allclose(field.displacement[..., 1, :], torch.tensor([0.0, -1.0]).expand(1, 2, 4, 5, 2))
    assert torch.allclose(field.mean_displacement, torch.tensor([0.5, -0.5]).expand(1, 2, 4, 5, 2))
    assert torch.allclose(field.confidence, torch.ones(1, 2, 4, 5, 2), atol=1e-6)
    # The heads' mixture is two equal peaks: entropy log 2 of the maximum log 9.
    assert torch.allclose(field.mean_confidence, torch.full((1, 2, 4, 5), 1 - math.log(2) / math.log(9)), atol=1e-6)

    with torch.no_grad():  # no bias at all: a uniform window, no motion, no confidence
        emim.rpb.zero_()
    field = motion_fields(Wrapper(emim), torch.randn(1, 3, 4, 5, 32))["attn"]
    assert field.mean_displacement.abs().max() < 1e-6 and field.mean_confidence.abs().max() < 1e-6


def test_window_displacements_are_row_major_dy_dx():
    offsets = window_displacements(3)
    assert offsets.tolist() == [[dy, dx] for dy in (-1.0, 0.0, 1.0) for dx in (-1.0, 0.0, 1.0)]


def test_fields_of_every_emim_layer_of_a_model_zoo_model_and_of_a_converted_layer_with_a_class_token():
    torch.manual_seed(0)
    model = create_model("emim_uniformer_xt", attn_backend="reference")
    fields = motion_fields(model, torch.randn(1, 3, 4, 64, 64))
    assert list(fields) == ["blocks3.0.attn", "blocks4.0.attn"]
    assert fields["blocks3.0.attn"].displacement.shape == (1, 3, 8, 8, 2, 2)
    assert fields["blocks4.0.attn"].mean_displacement.shape == (1, 3, 4, 4, 2)
    assert model.training  # restored after the pass

    # A converted layer (fixed grid, class token first): the class token is left out of the field.
    layer = GridEMIM(32, 2, window=3, grid=(3, 4, 5), num_prefix_tokens=1, backend="reference")
    field = motion_fields(Wrapper(layer), torch.randn(2, 1 + 60, 32))["attn"]
    assert field.grid == (3, 4, 5) and field.mean_displacement.shape == (2, 2, 4, 5, 2)


def test_a_model_without_emim_is_refused():
    with pytest.raises(ValueError, match=r"Sequential has no EMIM layer.*convert_to_emim"):
        motion_fields(nn.Sequential(nn.Linear(4, 4)), torch.randn(1, 4))

    class Skips(nn.Module):  # has an EMIM layer, never calls it
        def __init__(self):
            super().__init__()
            self.attn = EMIM(32, 2, window=3, backend="reference")

        def forward(self, x):
            return x

    with pytest.raises(ValueError, match=r"no EMIM layer of Skips ran"):
        motion_fields(Skips(), torch.randn(1, 4))


def test_flow_colour_coding():
    assert colour_wheel().shape == (55, 3)
    colours = flow_to_rgb(np.array([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, -1.0], [0.0, 0.5]]), 1.0)
    assert colours[0].tolist() == [255, 255, 255]   # no motion: white
    assert colours[1].tolist() == [255, 0, 0]       # right: red, the wheel's start
    assert colours[2][2] == 0 and colours[2][0] > 200 and colours[2][1] > 200  # down: yellow
    assert colours[3][0] == 0 and colours[3][1] > 200 and colours[3][2] > 200  # left: cyan
    assert colours[4].tolist() == [255, 128, 128]   # half length: half-way to white


# ----------------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def demo_clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("video") / "demo.mp4"
    assert main(["--make-demo-clip", str(path)]) == 0
    return path


def run_viz(*args):
    return main(["--model", "emim_uniformer_xt", "--frames", "4", "--backend", "reference", "--cell", "64",
                 *map(str, args)])


def test_command_writes_readable_pictures_and_prints_the_top_classes(demo_clip, tmp_path, capsys):
    out = tmp_path / "viz"
    assert run_viz("--video", demo_clip, "--out", out) == 0
    printed = capsys.readouterr().out
    assert "top-5 classes (untrained weights" in printed and printed.count("%") == 5

    flow, arrows, gif = (Image.open(out / name) for name in ("flow.png", "arrows.png", "motion.gif"))
    # 3 frame pairs of 64 px panels under a 30 px title row: frame + 2 layers + legend, and 2 layers.
    assert flow.format == "PNG" and flow.size == (4 * 64, 30 + 3 * 64)
    assert arrows.format == "PNG" and arrows.size == (2 * 64, 30 + 3 * 64)
    assert gif.format == "GIF" and gif.n_frames == 3
    flow.load(), arrows.load()  # the whole file decodes


def test_command_loads_a_trainer_checkpoint_with_its_class_count_and_names(demo_clip, tmp_path, capsys):
    torch.manual_seed(1)
    trained = create_model("emim_uniformer_xt", num_classes=3)
    checkpoint = tmp_path / "last.pt"
    torch.save({"model": trained.state_dict(), "epoch": 7}, checkpoint)
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"moving left": "0", "moving right": "1", "still": "2"}))

    assert run_viz("--video", demo_clip, "--out", tmp_path / "viz", "--checkpoint", checkpoint,
                   "--labels", labels) == 0
    printed = capsys.readouterr().out
    assert "top-3 classes" in printed and "untrained" not in printed
    assert all(name in printed for name in ("moving left", "moving right", "still"))


def test_command_explains_bad_inputs(demo_clip, tmp_path, capsys):
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video" * 100)
    assert run_viz("--video", broken, "--out", tmp_path) == 2
    assert "cannot read video" in capsys.readouterr().err
    assert run_viz("--video", tmp_path / "missing.mp4", "--out", tmp_path) == 2
    assert "no such file" in capsys.readouterr().err

    assert main(["--model", "uniformer_xt", "--video", str(demo_clip), "--out", str(tmp_path)]) == 2
    assert "uniformer_xt" in (err := capsys.readouterr().err) and "has no EMIM layer" in err
    with pytest.raises(SystemExit):
        main(["--model", "emim_uniformer_xt"])
    assert "required: --video, --out" in capsys.readouterr().err


def usage_error(capsys, argv) -> str:
    """The one error line of `emim-viz argv...`, which must exit with status 2 (argparse's usage errors)."""
    with pytest.raises(SystemExit) as exit_info:
        main([str(arg) for arg in argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: emim-viz")
    lines = [line for line in err.splitlines() if line.startswith("emim-viz: error: ")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("flags, message", [
    (["--frames", "0"], "argument --frames: expected an integer >= 1, got 0"),
    (["--frames", "-3"], "argument --frames: expected an integer >= 1, got -3"),
    (["--size", "0"], "argument --size: expected an integer >= 1, got 0"),
    (["--cell", "0"], "argument --cell: expected an integer in 16..1024, got 0"),
    (["--device", "nowhere"], "argument --device: expected a device such as cpu, cuda or cuda:1, got 'nowhere'"),
])
def test_command_refuses_bad_numbers_and_devices_before_any_work(demo_clip, tmp_path, capsys, flags, message):
    assert message in usage_error(capsys, ["--model", "emim_uniformer_xt", "--video", demo_clip,
                                           "--out", tmp_path / "viz", *flags])
    assert not (tmp_path / "viz").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_command_refuses_cuda_without_a_gpu(demo_clip, tmp_path, capsys):
    line = usage_error(capsys, ["--model", "emim_uniformer_xt", "--video", demo_clip, "--out", tmp_path,
                                "--device", "cuda"])
    assert "argument --device: 'cuda': torch sees no cuda device here; use --device cpu" in line


def test_command_refuses_the_triton_backend_on_the_cpu_without_the_interpreter(demo_clip, tmp_path, capsys,
                                                                               monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    line = usage_error(capsys, ["--model", "emim_uniformer_xt", "--video", demo_clip, "--out", tmp_path,
                                "--device", "cpu", "--backend", "triton"])
    assert "--backend triton runs the fused kernels on a CUDA GPU and --device is cpu" in line


def test_command_refuses_an_unusable_out_directory(demo_clip, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    (tmp_path / "taken" / "flow.png").mkdir(parents=True)
    for out, problem in [(a_file, "is a file, not a directory"), (a_file / "viz", f"{str(a_file)!r} is a file"),
                         (tmp_path / "taken", "holds a directory named flow.png")]:
        assert f"--out {str(out)!r}: {problem}" in usage_error(
            capsys, ["--model", "emim_uniformer_xt", "--video", demo_clip, "--out", out])


def test_command_refuses_more_frames_than_the_video_has(demo_clip, tmp_path, capsys):
    """The demo clip has 16 frames: sampling 17 would repeat one, which looks like motion stopping."""
    line = usage_error(capsys, ["--model", "emim_uniformer_xt", "--video", demo_clip, "--out", tmp_path / "viz",
                                "--frames", "17", "--backend", "reference"])
    assert f"--frames 17: the video {str(demo_clip)!r} has only 16 frames; expected --frames 16 or fewer" in line
    assert not (tmp_path / "viz").exists()

    short = tmp_path / "short.mp4"  # shorter than the 8 frames the model takes when --frames is not given
    write_video(short, translating_square(num_frames=4, size=32))
    line = usage_error(capsys, ["--model", "emim_uniformer_xt", "--video", short, "--out", tmp_path / "viz",
                                "--backend", "reference"])
    assert "--frames (default: emim_uniformer_xt's 8): the video" in line and "has only 4 frames" in line


def test_command_refuses_frames_smaller_than_the_models_stride(demo_clip, tmp_path, capsys):
    line = usage_error(capsys, ["--model", "emim_uniformer_xt", "--video", demo_clip, "--out", tmp_path,
                                "--size", "8", "--backend", "reference"])
    assert "--size 8: emim_uniformer_xt needs frames of at least 16 pixels" in line


@pytest.mark.parametrize("content, problem", [
    ("walking\nrunning\n", "it names 2 classes and the model has 3"),
    ('["a", "b", "c", "d"]', "it names 4 classes and the model has 3"),
    ('{"a": 0, "b": 1}', "it names 2 of the model's 3 classes; no name for index 2"),
    ('{"a": 0, "b": 1, "c": 3}', "class 'c' has index 3; the model's classes are 0 to 2"),
    ('{"a": 0, "b": 0, "c": 2}', "index 0 is given to both 'a' and 'b'"),
    ('{"a": 0, "b": 1, "c": "two"}', "class 'c' has index 'two'; expected an integer"),
], ids=["lines-short", "list-long", "dict-missing", "dict-out-of-range", "dict-duplicate", "dict-not-int"])
def test_command_refuses_labels_that_do_not_name_every_class_once(demo_clip, tmp_path, capsys, content, problem):
    checkpoint = tmp_path / "three.pt"
    torch.save(create_model("emim_uniformer_xt", num_classes=3).state_dict(), checkpoint)
    labels = tmp_path / "labels.txt"
    labels.write_text(content)
    line = usage_error(capsys, ["--model", "emim_uniformer_xt", "--video", demo_clip, "--out", tmp_path / "viz",
                                "--checkpoint", checkpoint, "--labels", labels, "--backend", "reference"])
    assert f"--labels {str(labels)!r}: {problem}" in line


def test_command_refuses_a_missing_labels_file(demo_clip, tmp_path, capsys):
    missing = tmp_path / "missing.txt"
    assert f"--labels {str(missing)!r}: no such file" in usage_error(
        capsys, ["--model", "emim_uniformer_xt", "--video", demo_clip, "--out", tmp_path, "--labels", missing])


def test_make_demo_clip_refuses_unwritable_paths_and_other_flags(tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    for path, problem in [(tmp_path / "missing" / "clip.mp4", "does not exist"),
                          (a_file / "clip.mp4", "is not a directory"),
                          (tmp_path, "is a directory, not a file name"),
                          (tmp_path / "clip.gif", "'gif' format does not support 'libx264' codec; expected an .mp4")]:
        line = usage_error(capsys, ["--make-demo-clip", path])
        assert line.startswith("emim-viz: error: --make-demo-clip") and problem in line
    line = usage_error(capsys, ["--make-demo-clip", tmp_path / "clip.mp4", "--frames", "4", "--out", tmp_path])
    assert "it takes no other flag, got --out, --frames" in line
    assert not (tmp_path / "clip.mp4").exists()
