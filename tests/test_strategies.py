"""Which kernels run the fused op (emim_triton/strategies.py): the strategy the tuned configurations record, the
environment's override, and the tuner's choice (faster *and* the same results, or not at all)."""

import dataclasses

import pytest
import torch

from emim_triton import autotune, emim_attention, strategies, tensor_core_backward, tensor_core_forward
from emim_triton.checks import EMIMShape
from emim_triton.launch_configs import EMIMConfigs, interpreter_configs
from emim_triton.tuning_cache import configs_from_json, configs_to_json
from helpers import make_inputs, test_device

SHAPE = EMIMShape(1, 3, 4, 5, 2, 16, 3)


def _configs(forward="offset_loop", backward="offset_loop") -> EMIMConfigs:
    base = interpreter_configs(SHAPE.height, SHAPE.width, SHAPE.window, SHAPE.head_dim, torch.float16)
    return dataclasses.replace(base, forward_strategy=forward, backward_strategy=backward)


def test_configurations_keep_their_strategies_through_the_cache_format():
    tuned = _configs("tensor_core", "tensor_core")
    assert configs_from_json(configs_to_json(tuned)) == tuned
    older = {k: v for k, v in configs_to_json(tuned).items() if k != "strategies"}  # shipped entries have none
    assert configs_from_json(older) == _configs()
    with pytest.raises(ValueError, match="forward_strategy must be one of"):
        configs_from_json({**configs_to_json(tuned), "strategies": {"forward": "wgmma"}})
    with pytest.raises(ValueError, match="strategies"):
        configs_from_json({**configs_to_json(tuned), "strategies": {"sideways": "tensor_core"}})


@pytest.fixture
def spies(monkeypatch):
    """Counts of the tensor-core forward runs and query-side launches, with the recorded configurations
    `_configs(...)` set by the test through `spies['configs']`."""
    calls = {"forward": 0, "backward": 0, "configs": _configs()}
    real_forward = tensor_core_forward.forward_tensor_core
    real_query = tensor_core_backward.backward_query_tensor_core_launch

    def forward(*a, **k):
        calls["forward"] += 1
        return real_forward(*a, **k)

    def query(*a, **k):
        calls["backward"] += 1
        return real_query(*a, **k)

    monkeypatch.setattr(tensor_core_forward, "forward_tensor_core", forward)
    monkeypatch.setattr(tensor_core_backward, "backward_query_tensor_core_launch", query)
    monkeypatch.setattr(autotune, "resolve_configs", lambda shape, dtype: autotune.Resolved(calls["configs"], "cache"))
    monkeypatch.delenv("EMIM_TRITON_FORWARD", raising=False)
    monkeypatch.delenv("EMIM_TRITON_BACKWARD", raising=False)
    return calls


def _forward_and_backward():
    inputs = make_inputs(*vars(SHAPE).values(), dtype=torch.float16, device=test_device(), seed=5)
    leaves = {n: t.detach().clone().requires_grad_() for n, t in inputs.items()}
    out = emim_attention(**leaves, backend="triton")
    out.float().square().sum().backward()


def test_the_op_runs_the_strategies_its_configurations_record(spies):
    _forward_and_backward()
    assert (spies["forward"], spies["backward"]) == (0, 0)  # offset loop: what untuned configurations say
    spies["configs"] = _configs("tensor_core", "offset_loop")
    _forward_and_backward()
    assert (spies["forward"], spies["backward"]) == (1, 0)
    spies["configs"] = _configs("offset_loop", "tensor_core")
    _forward_and_backward()
    assert (spies["forward"], spies["backward"]) == (1, 1)


def test_the_environment_forces_a_strategy_either_way(spies, monkeypatch):
    spies["configs"] = _configs("tensor_core", "tensor_core")
    monkeypatch.setenv("EMIM_TRITON_FORWARD", "offset_loop")
    monkeypatch.setenv("EMIM_TRITON_BACKWARD", "offset_loop")
    _forward_and_backward()
    assert (spies["forward"], spies["backward"]) == (0, 0)
    spies["configs"] = _configs()
    monkeypatch.setenv("EMIM_TRITON_FORWARD", "tensor_core")
    monkeypatch.setenv("EMIM_TRITON_BACKWARD", "tensor_core")
    _forward_and_backward()
    assert (spies["forward"], spies["backward"]) == (1, 1)


def test_a_case_the_tensor_core_kernels_do_not_take_runs_the_offset_loop(spies):
    spies["configs"] = _configs("tensor_core", "tensor_core")
    inputs = make_inputs(*vars(SHAPE).values(), dtype=torch.float32, device=test_device(), seed=5)  # float32
    emim_attention(**{n: t.requires_grad_() for n, t in inputs.items()}, backend="triton").sum().backward()
    assert (spies["forward"], spies["backward"]) == (0, 0)
    assert not strategies.tensor_core_takes("forward", SHAPE, torch.float32)
    assert strategies.tensor_core_takes("backward", SHAPE, torch.float16)


def _trials(forward_ms, backward_ms):
    return {"forward": autotune.StrategyTrial(1.0, forward_ms), "backward": autotune.StrategyTrial(2.0, backward_ms)}


def test_the_tuner_keeps_the_tensor_core_kernels_only_where_faster():
    configs = _configs()
    trials = _trials(0.5, 3.0)
    chosen = autotune.choose_strategies(SHAPE, torch.float16, configs, trials, device=torch.device(test_device()))
    assert (chosen.forward_strategy, chosen.backward_strategy) == ("tensor_core", "offset_loop")
    assert trials["forward"].chosen == "tensor_core" and "same results" in trials["forward"].note
    assert trials["backward"].chosen == "offset_loop" and trials["backward"].note == "the offset loop is faster"
    untimed = {"forward": autotune.StrategyTrial(1.0, None, note="the tensor-core kernels do not take this case")}
    assert autotune.choose_strategies(SHAPE, torch.float16, configs, untimed, device=torch.device(test_device())) == configs


def test_the_tuner_rejects_faster_kernels_that_compute_something_else(monkeypatch):
    real = tensor_core_forward.forward_tensor_core

    def spoiled(*a, **k):
        out, lse = real(*a, **k)
        return out * 1.05, lse

    monkeypatch.setattr(tensor_core_forward, "forward_tensor_core", spoiled)
    configs, trials = _configs(), _trials(0.5, 1.0)
    with pytest.warns(RuntimeWarning, match="faster .* but not used: .*change out"):
        chosen = autotune.choose_strategies(SHAPE, torch.float16, configs, trials, device=torch.device(test_device()))
    assert chosen == configs
    assert all(t.chosen == "offset_loop" and t.note.startswith("faster, but rejected") for t in trials.values())


def test_the_tuner_times_both_strategies_on_stand_in_tensors(monkeypatch):
    """time_strategies launches the tensor-core kernels' own default launches on random stand-in tensors and adds
    the backward's two sides; here each launch runs once in the interpreter and "takes" 0.1 ms."""
    ran = []
    monkeypatch.setattr(autotune.triton.testing, "do_bench", lambda launch, **_: (launch(), ran.append(launch), 0.1)[-1])
    configs = _configs()
    result = autotune.TuneResult(SHAPE, torch.float16, configs, configs, trials={
        "forward": [autotune.Trial("forward", configs.forward, 1.0)],
        "backward_query": [autotune.Trial("backward_query", configs.backward_query, 2.0)],
        "backward_key_value": [autotune.Trial("backward_key_value", configs.backward_key_value, 0.5)]})
    trials = autotune.time_strategies(result, autotune._DeviceTensors(torch.device(test_device())), 1, 1)
    assert (trials["forward"].offset_loop_ms, trials["forward"].tensor_core_ms) == (1.0, 0.1)
    assert (trials["backward"].offset_loop_ms, trials["backward"].tensor_core_ms) == (2.5, pytest.approx(0.2))
    assert len(ran) == 3  # forward, query side, key/value side

    result.dtype = torch.float32  # exact products: the tensor-core kernels do not take it
    assert all(t.tensor_core_ms is None and "do not take" in t.note
               for t in autotune.time_strategies(result, autotune._DeviceTensors(torch.device(test_device())), 1, 1).values())

    result.dtype = torch.float16
    monkeypatch.setattr(autotune.triton.testing, "do_bench", lambda launch, **_: 1 / 0)
    failed = autotune.time_strategies(result, autotune._DeviceTensors(torch.device(test_device())), 1, 1)
    assert all(t.tensor_core_ms is None and t.note.startswith("failed: ZeroDivisionError") for t in failed.values())
