"""`emim-bench` without a GPU: help, argument errors, the cost model against a hand count, and a CPU
`compare` that produces a well-formed table, JSON and CSV and says the fused path was not measured."""

import csv
import json
import subprocess
import sys

import pytest
import torch

from emim_triton.bench_cli.cli import main
from emim_triton.checks import EMIMShape
from emim_triton.cost_model import emim_cost, flops_per_query

TINY = "1,3,4,5,2,16,3"  # B, T, H, W, heads, D, K


def run_cli(capsys, *argv):
    """(exit status, stdout, stderr) of `emim-bench argv...`, run in this process."""
    try:
        status = main(list(argv))
    except SystemExit as e:  # argparse: --help exits 0, argument errors exit 2
        status = e.code
    out, err = capsys.readouterr()
    return status, out, err


# --- Help and argument errors ---------------------------------------------------------------------------


@pytest.mark.parametrize("command", [[], ["roofline"], ["autotune"], ["compare"]], ids=["top", "roofline",
                                                                                        "autotune", "compare"])
def test_help(capsys, command):
    status, out, _ = run_cli(capsys, *command, "--help")
    assert status == 0 and out.startswith("usage: emim-bench")
    for word in {"roofline": ["--gpu", "--shape"], "autotune": ["--max-configs", "--list", "--model"],
                 "compare": ["--backends", "--json", "--csv", "--plot", "--device"]}.get(
            command[0] if command else "", ["roofline", "autotune", "compare"]):
        assert word in out


def test_module_entry_point():
    done = subprocess.run([sys.executable, "-m", "emim_triton.bench_cli", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "usage: emim-bench" in done.stdout


@pytest.mark.parametrize("argv, message", [
    ([], "required"),
    (["roofline", "--shape", "1,2,3"], "expected 7 comma-separated integers"),
    (["roofline", "--shape", "1,2,3,4,5,6,x"], "expected integers"),
    (["roofline", "--shape", "1,3,4,5,2,16,4"], "K must be odd"),
    (["roofline", "--shape", "1,3,4,5,2,8,3"], "D must be in 16..128"),
    (["roofline", "--shape", "0,3,4,5,2,16,3"], "must be >= 1"),
    (["roofline", "--dtype", "int8"], "invalid choice"),
    (["roofline", "--bandwidth", "0"], "--bandwidth must be > 0"),
    (["roofline", "--model", "no_such_model"], "unknown model 'no_such_model'"),
    (["roofline", "--model", "emim_uniformer_s16", "--shape", TINY], "not allowed with"),
    (["compare", "--backends", "fused,nope"], "'nope' is not one of"),
    (["compare", "--modes", "sideways"], "'sideways' is not one of"),
    (["compare", "--device", "cpu", "--rotate", "0"], "--rotate must be >= 1"),
    (["autotune", "--max-configs", "-1"], ">= 0"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_argument_errors(capsys, argv, message):
    status, _, err = run_cli(capsys, *argv)
    assert status == 2
    assert message in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
@pytest.mark.parametrize("argv", [["autotune", "--shape", TINY], ["compare", "--device", "cuda", "--shape", TINY]])
def test_gpu_commands_say_there_is_no_gpu(capsys, argv):
    status, _, err = run_cli(capsys, *argv)
    assert status == 1
    assert "no CUDA GPU" in err or "sees none" in err


def test_autotune_list_needs_no_gpu(capsys):
    status, out, _ = run_cli(capsys, "autotune", "--list", "--shape", "32,16,14,14,5,64,7")
    assert status == 0
    assert "cache key bf16/K7/D64/h16w16s4096" in out
    for kernel in ("forward", "backward_query", "backward_key_value", "backward_weights"):
        assert kernel in out


# --- roofline: the cost model against a hand count --------------------------------------------------------


def test_cost_model_against_a_hand_count():
    # docs/operation.md: K = 7, D = 64 -> 6,272 + 6,272 + 19,208 + 25,088 FLOPs per query row and head.
    assert flops_per_query(7, 64) == {"qk": 6272, "av": 6272, "mlp_hidden": 19208, "mlp_out": 25088}
    # B=1, T=3, 4x5, 2 heads, D=16, K=3, bf16 activations and float32 parameters:
    #   rows: 1 batch * 2 pairs * 20 positions * 2 heads = 80
    #   per row: QK 2*9*16 = 288, AV 288, MLP 2*9*36 + 2*36*16 = 648 + 1152 -> 2,376; forward 190,080
    #   one frame of q (or k, v, out) = 20 * 2 * 16 = 640 elements
    #   forward bytes: q of 2 query frames + k, v of 2 key frames (6 * 640) + out of 3 frames (1,920)
    #     = 5,760 elements * 2 B = 11,520; parameters 2*9 + 36*9 + 36 + 16*36 + 16 = 970 * 4 B = 3,880
    #     -> 15,400 B
    #   backward bytes: the same reads (3,840) + upstream gradient (1,920) + dq, dk, dv (5,760)
    #     = 11,520 elements * 2 B = 23,040 + parameters read and their gradients 7,760 -> 30,800 B
    cost = emim_cost(EMIMShape(1, 3, 4, 5, 2, 16, 3), torch.bfloat16)
    assert (cost.forward_flops, cost.backward_flops) == (190_080, 380_160)
    assert (cost.forward_bytes, cost.backward_bytes) == (15_400, 30_800)
    # T = 1: the frame attends to itself; one pair computed, one frame read and written.
    single = emim_cost(EMIMShape(1, 1, 4, 5, 2, 16, 3), torch.float32)
    assert single.forward_flops == 40 * 2376
    assert single.forward_bytes == 4 * 640 * 4 + 3880


def test_roofline_prints_the_hand_count(capsys, tmp_path):
    out_json = tmp_path / "roofline.json"
    status, out, _ = run_cli(capsys, "roofline", "--shape", TINY, "--bandwidth", "1", "--tflops", "2",
                             "--json", str(out_json))
    assert status == 0
    assert "QK 288 + AV 288 + MLP 648 + 1,152 = 2,376 FLOPs; 80 rows" in out
    assert "given on the command line" in out
    modes = json.loads(out_json.read_text())["cases"][0]["modes"]
    forward, both = modes["forward"], modes["forward+backward"]
    assert (forward["flops"], forward["bytes"]) == (190_080, 15_400)
    assert (both["flops"], both["bytes"]) == (570_240, 46_200)
    assert forward["memory_floor_ms"] == pytest.approx(15_400 / 1e12 * 1e3)  # 1 TB/s
    assert forward["compute_floor_ms"] == pytest.approx(190_080 / 2e12 * 1e3)  # 2 TFLOP/s
    assert forward["bound"] == "compute"  # 95 ns of arithmetic against 15 ns of bytes


def test_roofline_defaults_name_their_datasheet(capsys):
    status, out, _ = run_cli(capsys, "roofline")
    assert status == 0
    assert "datasheet of the NVIDIA H200 SXM (bf16 dense), not measured" in out
    for name in ("uniformer-stage3", "uniformer-stage4", "generation-64x64"):
        assert name in out


def test_roofline_reads_a_models_shapes(capsys):
    pytest.importorskip("emim_triton.models")
    status, out, _ = run_cli(capsys, "roofline", "--model", "emim_uniformer_s16", "--batch", "8")
    assert status == 0
    assert "emim_uniformer_s16-14x14: B=8 T=16 14x14 heads=5 D=64 K=7" in out
    assert "emim_uniformer_s16-7x7: B=8 T=16 7x7 heads=8 D=64 K=7" in out


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


# --- compare on the CPU -----------------------------------------------------------------------------------


def test_compare_on_cpu_is_well_formed_and_honest(capsys, tmp_path):
    paths = {ext: tmp_path / f"result.{ext}" for ext in ("json", "csv", "png")}
    plot = ["--plot", str(paths["png"])] if _has_matplotlib() else []
    status, out, _ = run_cli(capsys, "compare", "--device", "cpu", "--shape", TINY, "--backends",
                             "fused,reference", "--warmup-ms", "5", "--rep-ms", "20", "--rotate", "2",
                             "--json", str(paths["json"]), "--csv", str(paths["csv"]), *plot)
    assert status == 0
    if plot:
        assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "NOTE: The fused Triton path was NOT measured in this run (no CUDA GPU)." in out
    assert "not measured: no CUDA GPU here" in out

    report = json.loads(paths["json"].read_text())
    assert report["meta"]["fused_measured"] is False and report["meta"]["device_type"] == "cpu"
    assert "measured on this CPU in this run" in report["meta"]["ceilings"]["source"]
    assert [c["name"] for c in report["cases"]] == ["1x3x4x5x2x16x3"]
    assert report["cases"][0]["forward_flops"] == 190_080
    rows = {(r["backend"], r["mode"]): r for r in report["rows"]}
    assert set(rows) == {(b, m) for b in ("fused", "reference") for m in ("forward", "forward+backward")}
    for mode in ("forward", "forward+backward"):
        fused, reference = rows[("fused", mode)], rows[("reference", mode)]
        assert fused["status"] == "skipped" and fused["median_ms"] is None
        assert reference["status"] == "ok" and reference["median_ms"] > 0
        assert reference["p20_ms"] <= reference["median_ms"] <= reference["p80_ms"]
        assert reference["tflops"] > 0 and reference["gbps"] > 0 and reference["roofline_fraction"] > 0
        assert reference["speedup_vs_reference"] == 1.0 and reference["fused_speedup"] is None
        assert reference["peak_mib"] is None  # no allocator statistics on the CPU
    assert rows[("reference", "forward")]["rel_err"] < 1e-5

    with open(paths["csv"]) as f:
        lines = list(csv.DictReader(f))
    assert len(lines) == 4
    assert {"case", "B", "K", "mode", "backend", "status", "median_ms", "tflops", "gbps", "dtype"} <= set(lines[0])


def test_compare_runs_the_compiled_reference_on_cpu(capsys, tmp_path):
    """torch.compile(reference) is checked against float64 and timed like the rest (~15 s of compiling)."""
    out_json = tmp_path / "result.json"
    status, out, _ = run_cli(capsys, "compare", "--device", "cpu", "--shape", "1,3,4,4,2,16,3", "--backends",
                             "reference,compiled", "--modes", "forward", "--warmup-ms", "5", "--rep-ms", "20",
                             "--json", str(out_json))
    assert status == 0
    rows = {r["backend"]: r for r in json.loads(out_json.read_text())["rows"]}
    compiled = rows["compiled"]
    assert compiled["status"] == "ok", compiled["note"]
    assert compiled["rel_err"] < 1e-5 and compiled["median_ms"] > 0
    assert compiled["first_call_s"] > 0  # the compile happened outside the timed calls
    assert compiled["speedup_vs_reference"] == pytest.approx(rows["reference"]["median_ms"] / compiled["median_ms"])
    assert "torch.compile(reference)" in out


@pytest.mark.fused
def test_compare_fills_the_fused_row_and_speedups(monkeypatch):
    """The fused row's path (configuration source, correctness check, timing, speed-ups), run on the
    interpreter here by lifting the no-GPU rule; its times mean nothing, only the report's form does."""
    from emim_triton.bench_cli import compare
    from emim_triton.bench_cli.cases import parse_shape

    if not torch.cuda.is_available():
        monkeypatch.setattr(compare, "unavailable", lambda backend, device, mode, variant=None: None)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    settings = compare.Settings(device=torch.device(device), dtype=torch.float32, backends=("fused", "reference"),
                                modes=("forward",), warmup_ms=1, rep_ms=1, rotate=1, tune=False)
    report = compare.run_compare([parse_shape("1,2,4,4,1,16,3")], settings, log=lambda message: None)
    fused, reference = report.rows
    assert (fused.backend, fused.status) == ("fused", "ok") and fused.note.startswith("configs: ")
    assert fused.rel_err < 1e-5
    assert fused.fused_speedup == 1.0
    assert reference.fused_speedup == pytest.approx(reference.median_ms / fused.median_ms)
    assert fused.speedup_vs_reference == pytest.approx(reference.median_ms / fused.median_ms)


# --- output paths are checked before any work -------------------------------------------------------------


@pytest.fixture
def no_run(monkeypatch):
    """Make any benchmark or tuning run fail the test: a bad output path must stop the command first."""
    from emim_triton.bench_cli import compare, tune

    def must_not_run(*args, **kwargs):
        raise AssertionError("the command started its run despite a bad output path")

    monkeypatch.setattr(compare, "run_compare", must_not_run)
    monkeypatch.setattr(tune, "run_autotune", must_not_run)


@pytest.mark.parametrize("flag", ["--json", "--csv", "--plot"])
def test_compare_checks_its_output_paths_before_running(capsys, tmp_path, no_run, flag):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    compare = ["compare", "--device", "cpu", "--shape", TINY]
    for path, problem in [(tmp_path / "missing" / "out", f"its directory {str(tmp_path / 'missing')!r} does not exist"),
                          (a_file / "out", "is not a directory"), (tmp_path, "is a directory, not a file name")]:
        status, _, err = run_cli(capsys, *compare, flag, str(path))
        assert status == 2 and f"{flag} {str(path)!r}: " in err and problem in err


def test_compare_refuses_two_outputs_in_one_file_and_a_plot_format_matplotlib_lacks(capsys, tmp_path, no_run):
    same = str(tmp_path / "out.json")
    status, _, err = run_cli(capsys, "compare", "--device", "cpu", "--json", same, "--csv", same)
    assert status == 2 and f"--json and --csv both name {same!r}" in err
    if _has_matplotlib():
        status, _, err = run_cli(capsys, "compare", "--device", "cpu", "--plot", str(tmp_path / "out.results"))
        assert status == 2 and "matplotlib cannot write .results files; expected one of" in err


def test_roofline_checks_its_json_path(capsys, tmp_path):
    status, out, err = run_cli(capsys, "roofline", "--shape", TINY, "--json", str(tmp_path / "missing" / "r.json"))
    assert status == 2 and "--json" in err and "does not exist" in err and out == ""


def test_autotune_checks_write_defaults_before_tuning(capsys, tmp_path, no_run):
    tune = ["autotune", "--shape", TINY]
    status, _, err = run_cli(capsys, *tune, "--write-defaults", str(tmp_path / "missing" / "d.json"))
    assert status == 2 and "--write-defaults" in err and "does not exist" in err
    broken = tmp_path / "defaults.json"
    broken.write_text("{not json")
    status, _, err = run_cli(capsys, *tune, "--write-defaults", str(broken))
    assert status == 2 and f"--write-defaults {str(broken)!r} exists and is not readable JSON" in err
    status, out, err = run_cli(capsys, *tune, "--list", "--write-defaults", str(tmp_path / "d.json"))
    assert status == 2 and "--write-defaults has nothing to write with --list" in err and out == ""


def test_autotune_checks_the_tuning_cache_directory_before_tuning(capsys, tmp_path, monkeypatch, no_run):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    monkeypatch.setenv("EMIM_TRITON_CACHE", str(a_file / "cache"))
    status, _, err = run_cli(capsys, "autotune", "--shape", TINY)
    assert status == 1
    assert f"the tuning cache directory {str(a_file / 'cache')!r} cannot be written" in err
    assert "set EMIM_TRITON_CACHE to a writable directory" in err


def test_static_is_a_subcommand_and_checks_its_output_paths_first(tmp_path, capsys, monkeypatch):
    from emim_triton.bench_cli import static

    monkeypatch.setattr(static, "run", lambda args: pytest.fail("compiled before checking the output path"))
    with pytest.raises(SystemExit) as exit_info:
        main(["static", "--json", str(tmp_path / "missing" / "static.json")])
    assert exit_info.value.code == 2 and "--json" in capsys.readouterr().err


def test_compare_measures_the_variant_it_is_asked_for(capsys, tmp_path, monkeypatch):
    """--direction/--dilation reach every backend and the float64 check; a backend that implements only the
    paper's op (FlexAttention) says so instead of timing something else."""
    from emim_triton.bench_cli import compare as compare_module

    seen = []
    real_reference = compare_module.emim_reference

    def spying_reference(*args, **kwargs):
        seen.append((kwargs.get("direction"), kwargs.get("dilation")))
        return real_reference(*args, **kwargs)

    monkeypatch.setattr(compare_module, "emim_reference", spying_reference)
    out_json = tmp_path / "result.json"
    status, _, _ = run_cli(capsys, "compare", "--device", "cpu", "--shape", TINY, "--backends", "reference,flex",
                           "--modes", "forward", "--warmup-ms", "5", "--rep-ms", "20", "--direction", "prev",
                           "--dilation", "2", "--json", str(out_json))
    assert status == 0 and ("prev", 2) in seen
    report = json.loads(out_json.read_text())
    assert report["meta"]["variant"] == {"direction": "prev", "dilation": 2}
    rows = {r["backend"]: r for r in report["rows"]}
    assert rows["reference"]["status"] == "ok" and rows["reference"]["rel_err"] < 1e-5
    assert rows["flex"]["status"] == "skipped" and "paper's op only" in rows["flex"]["note"]


def test_static_refuses_to_model_the_tensor_core_forward_where_the_op_would_not_run_it(capsys):
    status, _, err = run_cli(capsys, "static", "--forward", "tensor_core", "--dtype", "fp32")
    assert status == 2 and "does not take this shape and dtype" in err


def test_static_refuses_to_model_the_tensor_core_backward_where_the_op_would_not_run_it(capsys):
    status, _, err = run_cli(capsys, "static", "--backward", "tensor_core", "--shape", "2,4,14,14,2,64,9")
    assert status == 2 and "tensor-core query backward does not take" in err
