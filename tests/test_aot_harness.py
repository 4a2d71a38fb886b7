"""The ahead-of-time GPU compile harness (emim_triton.aot): real NVIDIA compiles without a GPU.

These run the same with and without TRITON_INTERPRET=1 (conftest sets it when there is no GPU). With it,
`@triton.jit` made interpreter functions, which the compiler cannot follow, so the harness compiles in a
child process started without it; the kernels below are at module level so that the child can import
them. The compiles are batched into one `compile_jobs` call (one child) shared by the tests.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
import triton
import triton.language as tl

from emim_triton.aot import (AOTCompileError, CompiledKernelInfo, CompileJob, _child_environment, _parse_ptxas_log,
                             aot_supported, compile_for_gpu, compile_jobs, triton_compiles_here)

SUPPORTED, REASON = aot_supported()
needs_ptxas = pytest.mark.skipif(not SUPPORTED, reason=REASON)


@triton.jit
def _masked_dot_kernel(a_ptr, b_ptr, c_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn, stride_cm,
                       stride_cn, BLOCK: tl.constexpr):
    """C = A @ B for one BLOCK x BLOCK tile, masked to M x N x K."""
    rm = tl.arange(0, BLOCK)
    rn = tl.arange(0, BLOCK)
    rk = tl.arange(0, BLOCK)
    a = tl.load(a_ptr + rm[:, None] * stride_am + rk[None, :] * stride_ak,
                mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
    b = tl.load(b_ptr + rk[:, None] * stride_bk + rn[None, :] * stride_bn,
                mask=(rk[:, None] < K) & (rn[None, :] < N), other=0.0)
    c = tl.dot(a, b)
    tl.store(c_ptr + rm[:, None] * stride_cm + rn[None, :] * stride_cn, c, mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def _scaled(x, scale):
    return x * scale


@triton.jit
def _helper_call_kernel(x_ptr, y_ptr, n, scale, BLOCK: tl.constexpr):
    """Calls a @triton.jit helper, as the EMIM kernels do."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n)
    tl.store(y_ptr + offs, _scaled(x, scale), mask=offs < n)


@triton.jit
def _row_softmax_kernel(x_ptr, y_ptr, n_cols, stride_row, BLOCK: tl.constexpr):
    """Uses Triton's standard library (tl.cdiv, tl.max, x.sum(), tl.sigmoid): @triton.jit functions too."""
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_row + cols, mask=mask, other=-float("inf"))
    e = tl.exp(x - tl.max(x, axis=0))
    y = e / e.sum(axis=0) + 0 * tl.sigmoid(x) * tl.cdiv(n_cols, BLOCK)
    tl.store(y_ptr + row * stride_row + cols, y, mask=mask)


def _dot_args(block: int, dtype=torch.float16) -> dict:
    a = torch.empty(block, block, dtype=dtype)
    c = torch.empty(block, block, dtype=torch.float32)
    return dict(a_ptr=a, b_ptr=a, c_ptr=c, M=block - 3, N=block - 3, K=block - 3,
                stride_am=a.stride(0), stride_ak=a.stride(1), stride_bk=a.stride(0), stride_bn=a.stride(1),
                stride_cm=c.stride(0), stride_cn=c.stride(1))


_X = torch.empty(1000, dtype=torch.bfloat16)
_ROWS = torch.empty(4, 100, dtype=torch.float32, device="meta")  # only dtypes matter
JOBS = {
    "dot-sm80": CompileJob(_masked_dot_kernel, _dot_args(32), {"BLOCK": 32}, arch=80, num_warps=4, num_stages=2),
    "dot-sm90": CompileJob(_masked_dot_kernel, _dot_args(32), {"BLOCK": 32}, arch=90, num_warps=4, num_stages=2),
    # The interpreter computes an 8x8 tl.dot happily; the GPU compiler wants K >= 16 (M, N >= 1 in 3.6-3.9).
    "dot-8": CompileJob(_masked_dot_kernel, _dot_args(8), {"BLOCK": 8}, arch=90),
    "helper": CompileJob(_helper_call_kernel, {"x_ptr": _X, "y_ptr": _X, "n": _X.numel(), "scale": 0.5},
                         {"BLOCK": 128}, arch=90, num_warps=4, num_stages=1),
    "stdlib": CompileJob(_row_softmax_kernel, {"x_ptr": _ROWS, "y_ptr": _ROWS, "n_cols": 100,
                                               "stride_row": _ROWS.stride(0)}, {"BLOCK": 128}, arch=90, num_stages=1),
}


@pytest.fixture(scope="module")
def compiled() -> dict:
    if not SUPPORTED:
        pytest.skip(REASON)
    return dict(zip(JOBS, compile_jobs(list(JOBS.values()))))


@pytest.mark.parametrize("arch", [80, 90])
def test_masked_dot_compiles_with_its_ptxas_statistics(compiled, arch):
    info = compiled[f"dot-sm{arch}"]
    assert isinstance(info, CompiledKernelInfo)
    assert info.name == "_masked_dot_kernel" and info.arch == arch
    assert (info.num_warps, info.num_stages) == (4, 2)
    assert info.shared_bytes >= 0
    assert info.ptx_chars > 0
    # Numbers, not None: a ptxas log the parser no longer understands must fail here.
    assert isinstance(info.registers, int) and 0 < info.registers <= 255
    assert isinstance(info.spills, int) and info.spills >= 0


def test_dot_below_16_is_rejected_in_place(compiled):
    error = compiled["dot-8"]
    assert isinstance(error, AOTCompileError)
    assert "_masked_dot_kernel does not compile for sm_90" in str(error)
    assert isinstance(compiled["helper"], CompiledKernelInfo), "one failed job must not hide the others"


def test_kernel_calling_a_helper_compiles(compiled):
    assert compiled["helper"].ptx_chars > 0


def test_kernel_using_triton_standard_library_compiles(compiled):
    assert compiled["stdlib"].ptx_chars > 0


def test_ptxas_log_parser_reads_the_named_kernel():
    log = ("ptxas info    : Compiling entry function 'other' for 'sm_90a'\n"
           "ptxas info    : Function properties for other\n"
           "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
           "ptxas info    : Used 12 registers, used 0 barriers\n"
           "ptxas info    : Compiling entry function 'k' for 'sm_90a'\n"
           "ptxas info    : Function properties for k\n"
           "    56 bytes stack frame, 72 bytes spill stores, 80 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 1 barriers, 56 bytes cumulative stack size\n")
    assert _parse_ptxas_log(log, "k") == (255, 72)
    assert _parse_ptxas_log(log, "other") == (12, 0)
    assert _parse_ptxas_log(log, "missing") == (None, None)


@needs_ptxas
@pytest.mark.skipif(not triton.knobs.runtime.interpret, reason="runs a kernel: needs the interpreter here")
def test_compile_under_the_interpreter_leaves_it_working():
    # One compile_for_gpu call (a child process of its own) between two interpreted runs of the same kernel.
    x = torch.randn(3, 8)
    y = torch.empty_like(x)
    _row_softmax_kernel[(3, )](x, y, 5, x.stride(0), BLOCK=8)
    torch.testing.assert_close(y[:, :5], torch.softmax(x[:, :5], dim=1))
    before = os.environ.get("TRITON_INTERPRET")
    info = compile_for_gpu(_row_softmax_kernel, {"x_ptr": x, "y_ptr": y, "n_cols": 5, "stride_row": 8},
                           {"BLOCK": 16}, arch=80, num_stages=1)
    assert info.name == "_row_softmax_kernel" and isinstance(info.registers, int)
    assert os.environ.get("TRITON_INTERPRET") == before
    y.zero_()
    _row_softmax_kernel[(3, )](x, y, 5, x.stride(0), BLOCK=8)
    torch.testing.assert_close(y[:, :5], torch.softmax(x[:, :5], dim=1))


@needs_ptxas
def test_command_line_answers_in_json_without_the_interpreter():
    """`python -m emim_triton.aot` reads jobs on stdin and answers each, in order, on stdout."""
    jobs = [JOBS["dot-8"].to_json(), JOBS["helper"].to_json()]
    done = subprocess.run([sys.executable, "-m", "emim_triton.aot", "--jobs", "-", "--output", "-", "--cubin"],
                          input=json.dumps(jobs), capture_output=True, text=True, env=_child_environment(), timeout=300)
    assert done.returncode == 0, done.stderr
    error, helper = json.loads(done.stdout)
    assert "AOTCompileError" in error["error"]
    info = CompiledKernelInfo.from_json(helper)
    assert info.name == "_helper_call_kernel" and info.cubin[:4] == b"\x7fELF"


def test_argument_mismatch_is_a_value_error():
    args = _dot_args(32)
    with pytest.raises(ValueError, match="missing constexpr BLOCK"):
        compile_for_gpu(_masked_dot_kernel, args, {})
    with pytest.raises(ValueError, match="no parameter"):
        compile_jobs([CompileJob(_masked_dot_kernel, {**args, "bogus": 1}, {"BLOCK": 32})])
    del args["M"]
    with pytest.raises(ValueError, match="missing argument M"):
        compile_for_gpu(_masked_dot_kernel, args, {"BLOCK": 32})


@pytest.mark.skipif(triton_compiles_here(), reason="compiles in this process: local kernels are fine")
def test_local_kernel_under_the_interpreter_is_refused_clearly():
    @triton.jit
    def _local_kernel(x_ptr, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(x_ptr + offs, tl.load(x_ptr + offs) + 1)

    with pytest.raises(ValueError, match="defined inside a function"):
        compile_for_gpu(_local_kernel, {"x_ptr": torch.empty(64)}, {"BLOCK": 64}, arch=80, num_stages=1)
