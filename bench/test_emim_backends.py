"""Each backend of `emim-bench compare`, forward and forward+backward, on the default GPU cases.

Same inputs, checks and competitors as `emim-bench compare` (emim_triton/bench_cli/compare.py), in
pytest-benchmark's form for tracking runs over time (--benchmark-save, --benchmark-compare). Its clock
is the host's, around a call and a device synchronize; the CUDA-event medians of `emim-bench compare`
are the numbers to quote. The fused op runs the configurations the op resolves (tuning cache, shipped
defaults or heuristic): run `emim-bench autotune` first to time it tuned.
"""

import pytest
import torch

from emim_triton.bench_cli.backends import BACKENDS, make_op, unavailable
from emim_triton.bench_cli.cases import GPU_CASES
from emim_triton.bench_cli.compare import forward_call, make_input_set, training_call
from emim_triton.bench_cli.timing import Rotating
from emim_triton.cost_model import MODES, emim_cost

DTYPE = torch.bfloat16
INPUT_SETS = 3


@pytest.fixture(scope="module")
def device():
    return torch.device("cuda")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: c.name)
def test_emim(benchmark, device, case, backend, mode):
    reason = unavailable(backend, device, mode)
    if reason:
        pytest.skip(reason)
    torch._dynamo.reset()
    op = make_op(backend, case, device)
    make_call = forward_call if mode == "forward" else training_call
    calls = [make_call(op, make_input_set(case.shape, DTYPE, device, seed)) for seed in range(INPUT_SETS)]
    rotating = Rotating(calls)

    def step():
        rotating()
        torch.cuda.synchronize(device)

    for call in calls:  # compile and warm up outside the timed rounds
        call()
    benchmark.pedantic(step, rounds=50, iterations=1, warmup_rounds=5)

    cost = emim_cost(case.shape, DTYPE)
    seconds = benchmark.stats.stats.median
    benchmark.extra_info.update(flops=cost.flops(mode), bytes=cost.bytes(mode),
                                tflops=cost.flops(mode) / seconds / 1e12, gbps=cost.bytes(mode) / seconds / 1e9)
