"""The GPU scripts of bench/ that can also run a tiny version here: bench/large_inputs.py.

Its full-size check (inputs past 2**31 elements) needs a GPU with ~110 GB; `--small` runs the same
slice logic on a tiny shape, the fused op in the Triton interpreter (tests/conftest.py). The checker is
also shown to fail when the op writes a wrong output or a gradient outside the compared slices.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from emim_triton.reference import emim_reference

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "large_inputs.py"


@pytest.fixture(scope="module")
def large_inputs():
    spec = importlib.util.spec_from_file_location("large_inputs", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_large_inputs_small_passes_with_the_fused_op(large_inputs, tmp_path):
    path = tmp_path / "large.json"
    assert large_inputs.main(["--small", "--device", "cpu", "--json", str(path)]) == 0
    result = json.loads(path.read_text())
    assert result["ok"] and result["backend"] == "triton"
    assert [(s["b"], s["t0"]) for s in result["slices"]] == [(0, 0), (1, 1)]  # first and last entries
    assert set(result["errors"]) == {"out", "dq", "dk", "dv", "drpb", "dw1", "db1", "dw2", "db2"}


def misplaced_output(q, k, v, *params, backend):
    """The reference, with one wrong value at the very last element (the largest offset)."""
    out = emim_reference(q, k, v, *params)
    bump = torch.zeros_like(out)
    bump.view(-1)[-1] = 1.0
    return out + bump


def stray_gradient(q, k, v, *params, backend):
    """The reference's output unchanged, but every element of q gets a gradient."""
    return emim_reference(q, k, v, *params) + 1e-3 * (q.sum() - q.sum().detach())


@pytest.mark.parametrize("op, failing", [(misplaced_output, "out"), (stray_gradient, "q")])
def test_large_inputs_check_fails_on_a_wrong_op(large_inputs, monkeypatch, tmp_path, op, failing):
    monkeypatch.setattr(large_inputs, "emim_attention", op)
    path = tmp_path / "large.json"
    assert large_inputs.main(["--small", "--device", "cpu", "--backend", "reference", "--json", str(path)]) == 1
    result = json.loads(path.read_text())
    if failing == "out":
        assert not result["errors"]["out"]["ok"] and result["nonzero_gradients_outside_slices"]["q"] == 0
    else:
        assert result["errors"]["out"]["ok"] and result["nonzero_gradients_outside_slices"]["q"] > 0


@pytest.mark.parametrize("argv, message", [
    (["--shape", "1,2,3"], "--shape must be 7 positive integers"),
    (["--shape", "2,1,4,4,1,16,3"], "T must be at least 2"),
    (["--small", "--shape", "2,2,4,4,1,16,3"], "--small and --shape exclude each other"),
    (["--device", "cpu"], "the default shape needs a GPU"),
])
def test_large_inputs_refuses_bad_arguments(large_inputs, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        large_inputs.parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_streaming_benchmark_runs_and_checks_the_stream_against_the_whole_clip(tmp_path):
    import runpy

    out = tmp_path / "streaming.json"
    script = Path(__file__).resolve().parents[1] / "bench" / "streaming.py"
    main = runpy.run_path(str(script))["main"]
    assert main(["--device", "cpu", "--small", "--repeats", "2", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {r["direction"] for r in rows} == {"prev", "next"}
    assert all(r["rel_err_vs_whole_clip"] < 1e-5 and r["step_ms_median"] > 0 for r in rows)
