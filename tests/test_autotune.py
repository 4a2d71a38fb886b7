"""The autotuner without a GPU: its search space, its cache on disk, and the order in which the op finds
its configurations. Timing itself needs a GPU (bench/ and `emim-bench autotune` on one)."""

import dataclasses
import inspect
import json
import os
import warnings
from importlib import resources

import pytest
import torch
import triton

from emim_triton import autotune, triton_backend
from emim_triton.checks import EMIMShape
from emim_triton.launch_configs import (KERNELS, MIN_DOT_DIM, candidate_configs, default_configs, estimate_resources,
                                 interpreter_configs, tile_efficiency)
from emim_triton.tuning_cache import (DeviceId, TuningCache, TuningCacheWarning, add_to_shipped_defaults,
                                      configs_to_json, entry_key, read_shipped_defaults, shape_bucket,
                                      write_json_atomically)
from helpers import AOT_REPORT, SHARED_MEMORY_LIMIT, compile_params, test_device

STAGE3 = EMIMShape(32, 16, 14, 14, 5, 64, 7)
STAGE4 = EMIMShape(32, 16, 7, 7, 8, 64, 7)
LARGE = EMIMShape(2, 8, 16, 16, 2, 128, 15)  # the largest window and head dim
H200 = DeviceId("NVIDIA H200", (9, 0))


# --- The search space ------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [STAGE3, STAGE4, LARGE, EMIMShape(1, 1, 2, 3, 1, 16, 3)], ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_candidates_follow_the_shape_rules(shape, dtype):
    heuristic = default_configs(shape.height, shape.width, shape.window, shape.head_dim, dtype)
    for kernel in KERNELS:
        candidates = candidate_configs(kernel, shape, dtype)
        assert candidates[0] == getattr(heuristic, kernel), "the heuristic's config comes first"
        assert len(set(candidates)) == len(candidates)
        for cfg in candidates[1:]:
            assert cfg.hidden_chunk >= MIN_DOT_DIM
            if kernel == "backward_weights":
                assert cfg.block_rows >= MIN_DOT_DIM
            else:
                assert cfg.block_q >= MIN_DOT_DIM
                assert tile_efficiency(shape.height, shape.width, cfg.block_h, cfg.block_w) >= 0.5


def test_no_large_tiles_for_a_small_map():
    """The issue's example: no 128-query tiles for a 7x7 map."""
    for kernel in ("forward", "backward_query", "backward_key_value"):
        assert max(cfg.block_q for cfg in candidate_configs(kernel, STAGE4)) <= 64


def _pruned_sample():
    """The pruned configurations most likely to fail -- the largest shared-memory and register estimates
    of each kernel -- for the stage-3 shape (bf16 on sm_90, float32 on sm_80) and the largest window and
    head dim (bf16 on sm_80, the smaller shared memory). ~20 compiles, ~1.5 s each."""
    for shape, dtype, arch in ((STAGE3, torch.bfloat16, 90), (LARGE, torch.bfloat16, 80),
                               (STAGE3, torch.float32, 80)):
        heuristic = default_configs(shape.height, shape.width, shape.window, shape.head_dim, dtype)
        for kernel in KERNELS:
            candidates = candidate_configs(kernel, shape, dtype)[1:]  # the heuristic is test_aot_compile's
            if not candidates:
                continue
            need = lambda cfg: estimate_resources(kernel, cfg, shape)  # noqa: E731
            picks = {max(candidates, key=lambda c: (need(c).shared_bytes, str(c))),
                     max(candidates, key=lambda c: (need(c).total_per_thread, str(c)))}
            for cfg in sorted(picks, key=str):
                configs = dataclasses.replace(heuristic, **{kernel: cfg})
                yield pytest.param(shape, dtype, kernel, configs, arch,
                                   id=f"K{shape.window}-D{shape.head_dim}-{str(dtype)[6:]}-sm{arch}-{kernel}-{cfg}")


PRUNED = list(_pruned_sample())


def _pruned_launch(shape, dtype, kernel, configs, arch):
    return triton_backend.example_launches(shape, dtype, configs)[kernel], arch


@pytest.fixture(scope="module")
def pruned_compiled() -> dict:
    return compile_params(PRUNED, lambda param: _pruned_launch(*param.values))


@pytest.mark.parametrize("shape, dtype, kernel, configs, arch", PRUNED)
def test_pruned_configs_pass_the_aot_compile_check(pruned_compiled, request, shape, dtype, kernel, configs, arch):
    """Pruning never leaves a configuration that fails to compile or needs too much shared memory."""
    launch, _ = _pruned_launch(shape, dtype, kernel, configs, arch)
    info = pruned_compiled[request.node.callspec.id]
    if isinstance(info, Exception):
        raise info
    AOT_REPORT.append((info, launch.constexprs))
    assert info.ptx_chars > 0
    assert info.shared_bytes <= SHARED_MEMORY_LIMIT[arch]
    assert info.shared_bytes <= estimate_resources(kernel, getattr(configs, kernel), shape).shared_bytes or \
        kernel == "backward_key_value", "the static shared-memory estimate must stay above the real need"


def test_sample_candidates_keeps_the_heuristic_and_is_deterministic():
    candidates = candidate_configs("forward", STAGE3)
    picked = autotune.sample_candidates(candidates, 10)
    assert len(picked) == 10 and picked[0] == candidates[0]
    assert picked == autotune.sample_candidates(candidates, 10)
    assert autotune.sample_candidates(candidates, None) == candidates


def test_tune_under_the_interpreter_times_nothing(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    result = autotune.tune(STAGE3, torch.float32)
    assert result.configs == interpreter_configs(14, 14, 7, 64, torch.float32)
    assert result.trials == {}


# --- The cache on disk -----------------------------------------------------------------------------------


def _configs(chunk=16):
    base = default_configs(14, 14, 7, 64)
    return dataclasses.replace(base, forward=dataclasses.replace(base.forward, hidden_chunk=chunk))


def _cache(tmp_path, device=H200, triton_version="3.9.0", kernel_version="k1"):
    return TuningCache(device, triton_version, kernel_version, directory=tmp_path)


def test_cache_round_trip(tmp_path):
    key = entry_key(STAGE3, torch.bfloat16)
    _cache(tmp_path).put(key, _configs(), {"kernels": {"forward": {"ms": 0.1}}})
    fresh = _cache(tmp_path)  # a new process: reads the file
    assert fresh.get(key) == _configs()
    assert fresh.info(key) == {"kernels": {"forward": {"ms": 0.1}}}
    assert fresh.get(entry_key(STAGE4, torch.bfloat16)) is None
    on_disk = json.loads(fresh.path.read_text())
    assert on_disk["device"] == "NVIDIA H200" and on_disk["capability"] == [9, 0]
    assert on_disk["entries"][key]["forward"] == _configs().forward.as_dict()


def test_cache_keys():
    bf16 = entry_key(STAGE3, torch.bfloat16)
    assert bf16 == "bf16/K7/D64/h16w16s4096"
    assert entry_key(STAGE3, torch.float16) != bf16
    assert entry_key(dataclasses.replace(STAGE3, window=5), torch.bfloat16) != bf16
    assert entry_key(dataclasses.replace(STAGE3, head_dim=32), torch.bfloat16) != bf16
    assert entry_key(STAGE4, torch.bfloat16) != bf16  # other map and head count
    # Nearby shapes share a bucket: another batch size, a 13x13 map.
    assert shape_bucket(dataclasses.replace(STAGE3, batch=30)) == shape_bucket(STAGE3)
    assert shape_bucket(dataclasses.replace(STAGE3, height=13, width=13)) == shape_bucket(STAGE3)
    assert shape_bucket(dataclasses.replace(STAGE3, height=28, width=28)) != shape_bucket(STAGE3)
    with pytest.raises(ValueError, match="no tuning for dtype"):
        entry_key(STAGE3, torch.float64)


def test_cache_file_per_device(tmp_path):
    key = entry_key(STAGE3, torch.bfloat16)
    _cache(tmp_path).put(key, _configs(16))
    other = _cache(tmp_path, device=DeviceId("NVIDIA A100-SXM4-80GB", (8, 0)))
    assert other.path.name == "nvidia-a100-sxm4-80gb-sm80.json" != _cache(tmp_path).path.name
    assert other.get(key) is None
    other.put(key, _configs(32))
    assert _cache(tmp_path).get(key) == _configs(16)


def test_cache_directory_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("EMIM_TRITON_CACHE", str(tmp_path / "mine"))
    assert TuningCache(H200, "3.9.0", "k1").path == tmp_path / "mine" / "nvidia-h200-sm90.json"
    monkeypatch.delenv("EMIM_TRITON_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert TuningCache(H200, "3.9.0", "k1").path.parent == tmp_path / "xdg" / "emim_triton"


def test_cache_write_is_atomic(tmp_path, monkeypatch):
    cache = _cache(tmp_path)
    cache.put("bf16/K7/D64/a", _configs(16))
    before = cache.path.read_bytes()

    def interrupted(src, dst):  # the process dies between writing the new file and putting it in place
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cache.put("bf16/K7/D64/b", _configs(32))
    monkeypatch.undo()
    assert cache.path.read_bytes() == before, "an interrupted write leaves the old file whole"
    assert [p.name for p in tmp_path.iterdir()] == [cache.path.name], "and no temporary file behind"
    write_json_atomically(tmp_path / "sub" / "x.json", {"a": 1})
    assert json.loads((tmp_path / "sub" / "x.json").read_text()) == {"a": 1}


def test_another_process_entries_are_kept(tmp_path):
    first, second = _cache(tmp_path), _cache(tmp_path)
    first.get("anything")  # both loaded the (absent) file
    second.get("anything")
    first.put("bf16/K7/D64/a", _configs(16))
    second.put("bf16/K7/D64/b", _configs(32))
    assert set(_cache(tmp_path).keys()) == {"bf16/K7/D64/a", "bf16/K7/D64/b"}


@pytest.mark.parametrize("content", ["{not json", "[]", '{"format": 1}', '{"format": 99, "entries": {}}',
                                     '{"format": 1, "device": "NVIDIA H200", "capability": [9, 0], "triton": "3.9.0", '
                                     '"kernel_version": "k1", "entries": {"x": {"forward": {"block_h": "8"}}}}'],
                         ids=["truncated", "list", "no-entries", "other-format", "bad-entry"])
def test_corrupt_cache_is_ignored_with_one_warning(tmp_path, content):
    cache = _cache(tmp_path)
    cache.path.write_text(content)
    with pytest.warns(TuningCacheWarning, match="unreadable") as caught:
        assert cache.get("bf16/K7/D64/x") is None
        assert cache.get("bf16/K7/D64/y") is None
        assert cache.keys() == []
    assert len(caught) == 1
    cache.put("bf16/K7/D64/x", _configs())  # the next tuning rewrites it
    with warnings.catch_warnings():
        warnings.simplefilter("error", TuningCacheWarning)
        assert _cache(tmp_path).get("bf16/K7/D64/x") == _configs()


@pytest.mark.parametrize("change", [dict(kernel_version="k2"), dict(triton_version="3.10.0"),
                                    dict(device=DeviceId("NVIDIA H200", (9, 1)))], ids=["kernel", "triton", "device"])
def test_stale_cache_is_ignored_with_one_warning(tmp_path, change):
    _cache(tmp_path).put("bf16/K7/D64/x", _configs())
    stale = _cache(tmp_path, **change)
    stale.path.parent.mkdir(exist_ok=True)
    if "device" in change:  # same file name on purpose: the header, not the name, decides
        stale.path.write_text(_cache(tmp_path).path.read_text())
    with pytest.warns(TuningCacheWarning, match="stale") as caught:
        assert stale.get("bf16/K7/D64/x") is None
        assert stale.get("bf16/K7/D64/x") is None
    assert len(caught) == 1


def test_the_shipped_defaults_are_read_whole_and_keyed_by_their_own_shapes():
    """Every entry of the package's data file is usable (none dropped as malformed) and sits under the key
    of the shape and dtype it was tuned for, so the op finds it for that shape."""
    text = resources.files("emim_triton.tuned").joinpath("tuned_configs.json").read_text()
    on_disk = {slug: device["entries"] for slug, device in json.loads(text)["devices"].items()}
    assert on_disk, "the package ships tuned configurations"
    with warnings.catch_warnings():
        warnings.simplefilter("error", TuningCacheWarning)
        assert read_shipped_defaults() == on_disk
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    for entries in on_disk.values():
        for key, entry in entries.items():
            tuned_for = EMIMShape(*entry["info"]["shape"])
            assert entry_key(tuned_for, dtypes[entry["info"]["dtype"]]) == key


def test_shipped_defaults():
    assert read_shipped_defaults('{"format": 1, "devices": {}}') == {}
    entry = configs_to_json(_configs())
    text = json.dumps({"format": 1, "devices": {"nvidia-h200-sm90": {"entries": {"bf16/K7/D64/x": entry}}}})
    assert read_shipped_defaults(text) == {"nvidia-h200-sm90": {"bf16/K7/D64/x": entry}}
    with pytest.warns(TuningCacheWarning, match="malformed"):
        bad = json.dumps({"devices": {"nvidia-h200-sm90": {"entries": {"k": {"forward": 3}}}}})
        assert read_shipped_defaults(bad) == {}
    with pytest.warns(TuningCacheWarning):
        assert read_shipped_defaults("{oops") == {}


def test_tuning_results_become_shipped_defaults(tmp_path):
    """`emim-bench autotune --write-defaults` on a GPU adds its winners to the package's data file."""
    path = tmp_path / "tuned_configs.json"
    path.write_text('{"format": 1, "devices": {}}')
    entry = configs_to_json(_configs())
    add_to_shipped_defaults(path, H200, {"bf16/K7/D64/x": entry}, "3.9.0", "k1")
    add_to_shipped_defaults(path, H200, {"bf16/K7/D64/y": entry}, "3.9.0", "k1")
    assert read_shipped_defaults(path.read_text()) == {"nvidia-h200-sm90": {"bf16/K7/D64/x": entry,
                                                                          "bf16/K7/D64/y": entry}}
    assert json.loads(path.read_text())["devices"]["nvidia-h200-sm90"]["device"] == "NVIDIA H200"


# --- Where the op gets its configurations -----------------------------------------------------------------


@pytest.fixture
def fake_gpu(tmp_path, monkeypatch):
    """The op's view of an H200 with an empty cache in tmp_path: nothing touches the real machine."""
    monkeypatch.setenv("EMIM_TRITON_CACHE", str(tmp_path))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.delenv("EMIM_TRITON_AUTOTUNE", raising=False)
    monkeypatch.setattr(autotune, "current_device", lambda: H200)
    tuned = []

    def fake_tune(shape, dtype, **kwargs):
        tuned.append((shape, dtype))
        return autotune.TuneResult(shape, dtype, _configs(64), _configs(16))

    monkeypatch.setattr(autotune, "tune", fake_tune)
    autotune.reset()
    monkeypatch.setattr(autotune, "_shipped", {})  # no shipped defaults unless a test sets some
    yield tuned
    autotune.reset()


def _heuristic(shape, dtype=torch.bfloat16):
    return default_configs(shape.height, shape.width, shape.window, shape.head_dim, dtype)


def test_untuned_shape_uses_the_heuristic_without_tuning(fake_gpu):
    resolved = autotune.resolve_configs(STAGE3, torch.bfloat16)
    assert resolved == autotune.Resolved(_heuristic(STAGE3), "heuristic")
    assert fake_gpu == [], "never tunes unasked"


def test_opt_in_tunes_once_and_caches(fake_gpu, monkeypatch, tmp_path):
    monkeypatch.setenv("EMIM_TRITON_AUTOTUNE", "1")
    assert autotune.resolve_configs(STAGE3, torch.bfloat16) == autotune.Resolved(_configs(64), "tuned")
    assert autotune.resolve_configs(STAGE3, torch.bfloat16).source == "tuned"  # remembered
    assert fake_gpu == [(STAGE3, torch.bfloat16)]
    autotune.reset()  # a new process finds it in the cache
    monkeypatch.delenv("EMIM_TRITON_AUTOTUNE")
    assert autotune.resolve_configs(STAGE3, torch.bfloat16) == autotune.Resolved(_configs(64), "cache")
    # ... and so does a nearby shape of the same bucket.
    nearby = dataclasses.replace(STAGE3, batch=30)
    assert autotune.resolve_configs(nearby, torch.bfloat16).source == "cache"
    assert (tmp_path / "nvidia-h200-sm90.json").exists()


def test_tune_and_cache_makes_the_op_use_the_new_entry_at_once(fake_gpu, tmp_path):
    """What `emim-bench compare` does for an untuned shape: the op, which already answered "heuristic" for
    it, must find the new cache entry on its next call, in this process."""
    assert autotune.resolve_configs(STAGE3, torch.bfloat16).source == "heuristic"
    result = autotune.tune_and_cache(STAGE3, torch.bfloat16, max_configs=4)
    assert result.configs == _configs(64) and fake_gpu == [(STAGE3, torch.bfloat16)]
    assert autotune.resolve_configs(STAGE3, torch.bfloat16) == autotune.Resolved(_configs(64), "cache")
    assert TuningCache(H200, triton.__version__, autotune.KERNEL_VERSION, directory=tmp_path).get(
        entry_key(STAGE3, torch.bfloat16)) == _configs(64)  # and on disk, for the next process


def test_shipped_defaults_come_after_the_cache(fake_gpu, monkeypatch):
    key = entry_key(STAGE3, torch.bfloat16)
    monkeypatch.setattr(autotune, "_shipped", {"nvidia-h200-sm90": {key: configs_to_json(_configs(32))}})
    assert autotune.resolve_configs(STAGE3, torch.bfloat16) == autotune.Resolved(_configs(32), "shipped")
    autotune.user_cache(H200).put(key, _configs(64))
    autotune.reset()
    monkeypatch.setattr(autotune, "_shipped", {"nvidia-h200-sm90": {key: configs_to_json(_configs(32))}})
    assert autotune.resolve_configs(STAGE3, torch.bfloat16) == autotune.Resolved(_configs(64), "cache")


def test_interpreter_gets_one_configuration_and_no_tuning(fake_gpu, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("EMIM_TRITON_AUTOTUNE", "1")
    resolved = autotune.resolve_configs(STAGE3, torch.float32)
    assert resolved == autotune.Resolved(interpreter_configs(14, 14, 7, 64, torch.float32), "interpreter")
    assert fake_gpu == []


def test_without_cuda_the_heuristic(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(autotune, "current_device", lambda: None)
    assert autotune.resolve_configs(STAGE3, torch.bfloat16) == autotune.Resolved(_heuristic(STAGE3), "heuristic")


def test_editing_any_kernel_changes_the_kernel_version(tmp_path):
    """Tuning caches are only valid for the kernels they were timed on: KERNEL_VERSION must follow every
    kernel source file, and nothing else."""
    kernels = [f for f in resources.files("emim_triton.kernels").iterdir() if f.name.endswith(".py")]
    for source in kernels:
        (tmp_path / source.name).write_bytes(source.read_bytes())
    assert autotune.kernel_version(tmp_path) == autotune.KERNEL_VERSION  # a copy of the kernels digests the same
    (tmp_path / "notes.txt").write_text("not a kernel")
    assert autotune.kernel_version(tmp_path) == autotune.KERNEL_VERSION
    for source in kernels:
        copy = tmp_path / source.name
        copy.write_bytes(source.read_bytes() + b"\n# edited\n")
        assert autotune.kernel_version(tmp_path) != autotune.KERNEL_VERSION, f"editing {source.name}"
        copy.write_bytes(source.read_bytes())


# --- The tuner's launches, run in the interpreter ----------------------------------------------------------

TINY = EMIMShape(1, 3, 4, 5, 2, 16, 3)


@pytest.mark.fused
def test_tuning_launches_run_on_stand_in_tensors():
    """The tuner times the op's own launch descriptions on random stand-in tensors; they must run."""
    tensors = autotune._DeviceTensors(torch.device(test_device()))
    configs = default_configs(TINY.height, TINY.width, TINY.window, TINY.head_dim, torch.float32)
    launches = {kernel: tensors.materialize(launch)
                for kernel, launch in triton_backend.example_launches(TINY, torch.float32, configs).items()}
    assert all(t.device.type != "meta" and t.abs().sum() > 0 for t in tensors.tensors.values()), "random, not zeros"
    for launch in launches.values():
        launch()
    assert all(t.isfinite().all() for t in tensors.tensors.values())


@pytest.mark.fused
def test_winners_are_checked_against_the_heuristic():
    heuristic = default_configs(TINY.height, TINY.width, TINY.window, TINY.head_dim, torch.float32)
    other = dataclasses.replace(heuristic, forward=dataclasses.replace(heuristic.forward, block_h=2, block_w=8),
                                backward_weights=dataclasses.replace(heuristic.backward_weights, programs=3))
    autotune.check_same_results(TINY, torch.float32, other, heuristic, device=torch.device(test_device()))


@pytest.mark.fused
@pytest.mark.parametrize("kernel, buffer, spoiled", [("forward", "out", "out"),
                                                     ("backward_weights", "dw1_partial", "dw1")])
def test_winners_that_compute_something_else_are_rejected(monkeypatch, kernel, buffer, spoiled):
    """A tuned configuration whose kernel computes another function (here: its launch leaves one result 1 %
    off) must not pass the check against the heuristic, whether the forward or a backward kernel is wrong."""
    heuristic = default_configs(TINY.height, TINY.width, TINY.window, TINY.head_dim, torch.float32)
    wrong_cfg = dict(forward=dataclasses.replace(heuristic.forward, block_h=2, block_w=8),
                     backward_weights=dataclasses.replace(heuristic.backward_weights, programs=3))[kernel]
    real_launch = getattr(triton_backend, f"{kernel}_launch")

    def launch(*args, **kwargs):
        arguments = inspect.signature(real_launch).bind(*args, **kwargs).arguments
        launch = real_launch(*args, **kwargs)
        if arguments["cfg"] != wrong_cfg:
            return launch

        def off_by_one_percent():
            launch()
            arguments[buffer].mul_(1.01)
        return off_by_one_percent

    monkeypatch.setattr(triton_backend, f"{kernel}_launch", launch)
    tuned = dataclasses.replace(heuristic, **{kernel: wrong_cfg})
    with pytest.raises(RuntimeError, match=rf"change {spoiled} by a relative 1\.00e-02"):
        autotune.check_same_results(TINY, torch.float32, tuned, heuristic, device=torch.device(test_device()))


def test_a_failed_tuning_falls_back_with_a_warning(fake_gpu, monkeypatch):
    def broken(shape, dtype, **kwargs):
        raise torch.cuda.OutOfMemoryError("no room to tune")

    monkeypatch.setattr(autotune, "tune", broken)
    monkeypatch.setenv("EMIM_TRITON_AUTOTUNE", "1")
    with pytest.warns(RuntimeWarning, match="autotuning .* failed.*no room to tune"):
        resolved = autotune.resolve_configs(STAGE3, torch.bfloat16)
    assert resolved == autotune.Resolved(_heuristic(STAGE3), "heuristic")
    assert autotune.user_cache(H200).keys() == []
