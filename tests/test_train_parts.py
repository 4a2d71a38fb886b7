"""The trainer's parts on their own: configuration and its errors, optimizer groups, schedule, mixup, EMA,
checkpoints, metrics."""

from __future__ import annotations

import math
import random
import re

import numpy as np
import pytest
import torch
import torch.nn as nn

from emim_triton.train import checkpoint as ckpt
from emim_triton.train.cli import main
from emim_triton.train.config import ConfigError, parse_config, recipe_names
from emim_triton.train.ema import ModelEMA
from emim_triton.train.metrics import confusion_matrix, topk_correct, video_scores
from emim_triton.train.mixup import Mixer, cutmix_box, smooth_one_hot
from emim_triton.train.optim import lr_at, param_groups

RANDOM = ["--dataset", "random", "--model", "uniformer_xt"]


# ------------------------------------------------------------------------------------------ configuration

def test_yaml_then_flags(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("model: uniformer_xt\ndataset: random\nlr: 1e-3\nbatch-size: 3\ncrop_scale: [0.5, 1]\n"
                      "lr_mult: {'*motion_conv*': 10}\n")
    cfg, sources = parse_config(["--config", str(config), "--batch-size", "5", "--no-progress"])
    assert cfg.lr == 1e-3 and isinstance(cfg.lr, float)  # YAML reads 1e-3 as a string; accepted as a number
    assert cfg.batch_size == 5 and sources["batch_size"] == "command line"
    assert cfg.crop_scale == (0.5, 1.0) and cfg.lr_mult == {"*motion_conv*": 10.0} and cfg.progress is False
    cfg, _ = parse_config(RANDOM + ["--lr-mult", "*rpb=0", "head.*=2"])
    assert cfg.lr_mult == {"*rpb": 0.0, "head.*": 2.0}


@pytest.mark.parametrize("argv, message", [
    (["--lr", "-1"], r"lr = -1.0 \(command line\): must be > 0"),
    (["--batch-size", "0"], "batch_size = 0 .*must be >= 1"),
    (["--epochs", "2.5"], "epochs = '2.5' .*expected an integer"),
    (["--label-smoothing", "1"], "label_smoothing .*must be in \\[0, 1\\)"),
    (["--crop-scale", "0.9", "0.2"], "crop_scale .*0 < low <= high <= 1"),
    (["--warmup-epochs", "50", "--epochs", "10"], "warmup_epochs .*longer than the run"),
    (["--model", "emim_uniformer_s61"], "unknown model; did you mean emim_uniformer_s16"),
    (["--amp", "fp8"], "amp = 'fp8' .*must be one of auto, bf16, fp16, fp32"),
    (["--frame-template", "frame.jpg{x}"], "frame_template .*one integer field"),
    (["--lr-mult", "motion"], "expected PATTERN=MULTIPLIER"),
])
def test_bad_flags(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(RANDOM + argv)


def test_bad_yaml(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("model: uniformer_xt\nlearning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="unknown option 'learning_rate'"):
        parse_config(["--config", str(config)])
    config.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        parse_config(["--config", str(config)])
    config.write_text("ema: maybe\n")
    with pytest.raises(ConfigError, match="ema = 'maybe' .*expected true or false"):
        parse_config(["--config", str(config)])
    with pytest.raises(ConfigError, match="no such file, and not a shipped recipe"):
        parse_config(["--config", str(tmp_path / "absent.yaml")])
    with pytest.raises(ConfigError, match="data_root .*needs --data-root"):
        parse_config(["--model", "uniformer_xt", "--dataset", "ssv2"])


def test_main_reports_configuration_errors(capsys):
    assert main(RANDOM + ["--batch-size", "-2"]) == 2
    assert "configuration error: batch_size = -2" in capsys.readouterr().err
    assert main(RANDOM + ["--amp", "fp16", "--device", "cpu"]) == 2
    assert "fp16' needs a GPU" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    # the peak is lr scaled to the global batch: 1e-3 x 8 / 256, below this min_lr although lr is not
    (["--min-lr", "1e-4"], r"configuration error: min_lr = 0.0001 is above the peak learning rate 3.125e-05 "),
    (["--resume", "{tmp}/absent.pt"], r"configuration error: resume = '.*absent.pt' \(command line\): no such file"),
    (["--resume", "{tmp}/weights.pt"], r"checkpoint error: '.*weights.pt' is not a checkpoint of emim-train"),
    (["--test"], r"configuration error: test = True: --test needs weights"),
    (["--test", "--min-lr", "1"], r"--test needs weights"),  # the schedule does not matter to --test
])
def test_main_reports_run_errors_in_one_line(argv, message, tmp_path, capsys):
    torch.save({"model": {}}, tmp_path / "weights.pt")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    # --stop-after: a missed error ends in a one-step run (exit 0), not in a whole default training run
    common = ["--device", "cpu", "--run-dir", str(tmp_path / "run"), "--num-workers", "0", "--stop-after", "1"]
    assert main(RANDOM + common + argv) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and err.count("\n") == 1, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_main_reports_cuda_without_a_gpu(capsys):
    assert main(RANDOM + ["--device", "cuda"]) == 2
    assert "configuration error: device = 'cuda': torch sees no CUDA device" in capsys.readouterr().err


def test_main_reports_triton_on_cpu_without_the_interpreter(tmp_path, monkeypatch, capsys):
    from emim_triton.train.distributed import init_distributed
    from emim_triton.train.setup import resolve

    argv = RANDOM + ["--model", "emim_uniformer_xt", "--attn-backend", "triton", "--device", "cpu", "--run-dir",
                     str(tmp_path), "--num-workers", "0", "--stop-after", "1", "--num-frames", "2", "--img-size", "16"]
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert main(argv) == 2
    assert "attn_backend = 'triton' on the CPU needs Triton's interpreter" in capsys.readouterr().err
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # with it, the kernels run on the CPU: allowed
    assert resolve(parse_config(argv)[0], init_distributed("cpu")).attn_backend == "triton"


def test_shipped_recipes_are_valid():
    assert {"ssv1_s16", "ssv2_s16", "k400_s16", "motion_xt"} <= set(recipe_names())
    for name in recipe_names():
        cfg, _ = parse_config(["--config", name, "--data-root", "/data"])
        assert cfg.model in ("emim_uniformer_s16", "emim_uniformer_xt")
    assert parse_config(["--config", "ssv2_s16", "--data-root", "/d"])[0].flip is False


# -------------------------------------------------------------------------------- optimisation pieces

def test_no_weight_decay_groups():
    from emim_triton.models import create_model

    model = create_model("emim_uniformer_xt", num_classes=5, attn_backend="reference")
    groups = param_groups(model, 0.05, {"*motion_conv*": 10.0})
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    assert "blocks3.0.attn.rpb" not in decayed                      # no_weight_decay(), although 3-D
    assert not any(n.endswith(".bias") or "norm" in n for n in decayed)
    assert "blocks3.0.attn.qkv.weight" in decayed and "head.weight" in decayed
    fast = {names[id(p)] for g in groups if g["lr_mult"] == 10.0 for p in g["params"]}
    assert fast and all("motion_conv" in n for n in fast)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_learning_rate_schedule():
    schedule = dict(peak=1.0, total_steps=100, warmup_steps=10, warmup_lr=0.0, min_lr=0.01)
    assert lr_at(0, **schedule) == 0.0 and lr_at(5, **schedule) == 0.5 and lr_at(10, **schedule) == 1.0
    assert lr_at(55, **schedule) == pytest.approx(0.505)
    assert lr_at(100, **schedule) == pytest.approx(0.01)
    values = [lr_at(s, **schedule) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_mixup_and_cutmix_on_clips():
    clips = torch.arange(4.0).view(4, 1, 1, 1, 1).expand(4, 3, 6, 8, 8).clone()
    labels = torch.tensor([0, 1, 2, 3])
    cutmix = Mixer(4, mixup=0.0, cutmix=1.0, smoothing=0.0)
    for seed in range(5):
        mixed, targets = cutmix(clips, labels, torch.Generator().manual_seed(seed))
        pasted = mixed[0] != 0
        # the box is cut in H and W and spans every frame and channel: time is never spliced
        assert torch.equal(pasted, pasted[:1, :1].expand_as(pasted))
        area = pasted[0, 0].float().mean().item()
        assert targets[0].tolist() == pytest.approx([1 - area, 0, 0, area])
    mixup = Mixer(4, mixup=0.8, cutmix=0.0, smoothing=0.1)
    mixed, targets = mixup(clips, labels, torch.Generator().manual_seed(0))
    lam = 1 - mixed[0, 0, 0, 0, 0].item() / 3
    assert targets.sum(1).tolist() == pytest.approx([1.0] * 4)
    assert targets[0, 0].item() == pytest.approx(lam * (0.9 + 0.025) + (1 - lam) * 0.025)
    assert smooth_one_hot(labels, 4, 0.2)[1].tolist() == pytest.approx([0.05, 0.85, 0.05, 0.05])
    y0, y1, x0, x1 = cutmix_box(10, 10, 0.75, torch.Generator().manual_seed(0))
    assert 0 <= y0 <= y1 <= 10 and 0 <= x0 <= x1 <= 10


def test_ema():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    ema = ModelEMA(model, decay=0.99)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    before = ema.module[0].weight.clone()
    ema.update(model)  # first update: decay (1 + 0) / (10 + 0) = 0.1
    assert torch.allclose(ema.module[0].weight, 0.1 * before + 0.9 * model[0].weight)
    assert ema.module[1].num_batches_tracked == model[1].num_batches_tracked
    assert not any(p.requires_grad for p in ema.module.parameters())


# ------------------------------------------------------------------------------------------ checkpoints

def test_checkpoint_round_trip_with_rng(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = ckpt.rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    path = str(tmp_path / "x" / "last.pt")
    ckpt.save(dict(rng=[state], config={"lr": 0.1, "crop_scale": [0.5, 1.0]}, step=3), path)
    loaded = ckpt.load(path)  # weights_only=True: everything in it must be tensors and plain values
    ckpt.set_rng_state(loaded["rng"][0])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    assert [p.name for p in (tmp_path / "x").iterdir()] == ["last.pt"]  # no temporary file left behind
    torch.save({"model": {}}, tmp_path / "weights.pt")
    with pytest.raises(ValueError, match="not a checkpoint of emim-train.*--pretrained"):
        ckpt.load(str(tmp_path / "weights.pt"))


# -------------------------------------------------------------------------------------------- metrics

def test_metrics():
    scores = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5]])
    labels = torch.tensor([1, 1, 0])
    assert topk_correct(scores, labels, ks=(1, 2)) == {1: 1, 2: 2}
    # two views per video; video 1 has one view only (its other view was unreadable)
    view_scores = torch.tensor([[2.0, 0.0], [0.0, 2.0], [5.0, 0.0]])
    averaged, seen = video_scores(view_scores, torch.tensor([0, 1, 2]), views=2, num_videos=2)
    assert seen.tolist() == [True, True] and averaged[0, 0] == pytest.approx(0.5)
    assert averaged[1, 0] == pytest.approx(math.exp(5) / (math.exp(5) + 1))
    matrix = confusion_matrix(torch.tensor([1, 0, 2]), torch.tensor([1, 1, 0]), 3)
    assert matrix.tolist() == [[0, 0, 1], [1, 1, 0], [0, 0, 0]]


def test_main_stops_early_on_a_mostly_missing_dataset(tmp_path, capsys):
    import json

    (tmp_path / "labels.json").write_text(json.dumps({"Moving something up": "0"}))
    (tmp_path / "train.json").write_text(json.dumps([{"id": str(i), "template": "Moving [something] up"}
                                                     for i in range(4)]))
    argv = ["--model", "uniformer_xt", "--dataset", "ssv2", "--data-root", str(tmp_path / "videos"),
            "--train-list", str(tmp_path / "train.json"), "--val-list", str(tmp_path / "train.json"),
            "--labels-file", str(tmp_path / "labels.json"), "--run-dir", str(tmp_path / "run")]
    assert main(argv) == 2
    assert "4 of 4 listed videos (100%) do not exist" in capsys.readouterr().err


# ------------------------------------------------------------------------------- config -> data options

def test_every_data_option_reaches_the_datasets_under_its_own_name():
    """data_options() hands each DataOptions field the TrainConfig value of the same name (a marker per
    field, so a field filled from another option, or left at its default, shows)."""
    import dataclasses

    from emim_triton.data.build import DataOptions
    from emim_triton.train.config import TrainConfig
    from emim_triton.train.setup import DATA_FIELDS_WITHOUT_OPTION, DATA_OPTION_FIELDS, data_options

    cfg = dataclasses.replace(TrainConfig(), **{name: ("set by the user", name) for name in DATA_OPTION_FIELDS})
    options = data_options(cfg)
    for name in DATA_OPTION_FIELDS:
        assert getattr(options, name) == ("set by the user", name), name
    every_field = {f.name for f in dataclasses.fields(DataOptions)}
    assert every_field == set(DATA_OPTION_FIELDS) | set(DATA_FIELDS_WITHOUT_OPTION)


def test_an_option_renamed_on_one_side_only_is_refused():
    from emim_triton.train.setup import data_fields_from_config

    data_fields = ["dataset", "frame_stride", "random_samples"]
    assert data_fields_from_config(data_fields, ["dataset", "frame_stride"]) == ("dataset", "frame_stride")
    with pytest.raises(TypeError, match=r"without a TrainConfig option of the same name: \['frame_stride', "
                                        r"'random_samples'\]"):
        data_fields_from_config(data_fields, ["dataset", "dense_stride"])  # renamed in TrainConfig only
    with pytest.raises(TypeError, match=r"only \['random_samples'\] may lack one"):
        data_fields_from_config(["dataset", "frame_stride"], ["dataset", "frame_stride"])  # a stale exception
