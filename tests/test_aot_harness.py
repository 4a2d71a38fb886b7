"""The ahead-of-time GPU compile harness (emim_triton.aot): real NVIDIA compiles without a GPU.

These run the same with and without TRITON_INTERPRET=1 (conftest sets it when there is no GPU): the
harness must compile kernels that `@triton.jit` made into interpreter functions.
"""

import os

import pytest
import torch
import triton
import triton.language as tl

from emim_triton.aot import AOTCompileError, CompiledKernelInfo, aot_supported, compile_for_gpu

SUPPORTED, REASON = aot_supported()
pytestmark = pytest.mark.skipif(not SUPPORTED, reason=REASON)


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


@pytest.mark.parametrize("arch", [80, 90])
def test_masked_dot_compiles(arch):
    info = compile_for_gpu(_masked_dot_kernel, _dot_args(32), {"BLOCK": 32}, arch=arch, num_warps=4, num_stages=2)
    assert isinstance(info, CompiledKernelInfo)
    assert info.name == "_masked_dot_kernel" and info.arch == arch
    assert (info.num_warps, info.num_stages) == (4, 2)
    assert info.shared_bytes >= 0
    assert info.ptx_chars > 0
    assert info.registers is None or 0 < info.registers <= 255
    assert info.spills is None or info.spills >= 0


def test_dot_below_16_is_rejected():
    # The interpreter computes an 8x8 tl.dot happily; the GPU compiler wants K >= 16 (M, N >= 1 in 3.6-3.9).
    with pytest.raises(AOTCompileError) as err:
        compile_for_gpu(_masked_dot_kernel, _dot_args(8), {"BLOCK": 8}, arch=90)
    assert err.value.__cause__ is not None


def test_kernel_calling_a_helper_compiles():
    x = torch.empty(1000, dtype=torch.bfloat16)
    info = compile_for_gpu(_helper_call_kernel, {"x_ptr": x, "y_ptr": x, "n": x.numel(), "scale": 0.5},
                           {"BLOCK": 128}, arch=90, num_warps=4, num_stages=1)
    assert info.ptx_chars > 0


def test_kernel_using_triton_standard_library_compiles():
    x = torch.empty(4, 100, dtype=torch.float32, device="meta")  # only dtypes matter
    info = compile_for_gpu(_row_softmax_kernel, {"x_ptr": x, "y_ptr": x, "n_cols": 100, "stride_row": x.stride(0)},
                           {"BLOCK": 128}, arch=90, num_stages=1)
    assert info.ptx_chars > 0


def test_kernel_defined_in_a_function_compiles():
    @triton.jit
    def _local_helper(x):
        return x + 1

    @triton.jit
    def _local_kernel(x_ptr, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(x_ptr + offs, _local_helper(tl.load(x_ptr + offs)))

    info = compile_for_gpu(_local_kernel, {"x_ptr": torch.empty(64)}, {"BLOCK": 64}, arch=80, num_stages=1)
    assert info.ptx_chars > 0


@pytest.mark.skipif(not triton.knobs.runtime.interpret, reason="runs a kernel: needs the interpreter here")
def test_interpreter_runs_and_compiles_alternate():
    # Running a kernel that calls Triton's standard library leaves interpreter patches in
    # triton.language.core; compiling must see through them, and must not break the interpreter.
    args = {"x_ptr": torch.empty(1), "y_ptr": torch.empty(1), "n_cols": 5, "stride_row": 8}
    first = compile_for_gpu(_row_softmax_kernel, args, {"BLOCK": 16}, arch=80, num_stages=1)
    x = torch.randn(3, 8)
    y = torch.empty_like(x)
    _row_softmax_kernel[(3, )](x, y, 5, x.stride(0), BLOCK=8)
    torch.testing.assert_close(y[:, :5], torch.softmax(x[:, :5], dim=1))
    assert compile_for_gpu(_row_softmax_kernel, args, {"BLOCK": 16}, arch=80, num_stages=1) == first
    y.zero_()
    _row_softmax_kernel[(3, )](x, y, 5, x.stride(0), BLOCK=8)
    torch.testing.assert_close(y[:, :5], torch.softmax(x[:, :5], dim=1))


def test_compile_leaves_interpreter_setting_alone():
    before = os.environ.get("TRITON_INTERPRET")
    compile_for_gpu(_masked_dot_kernel, _dot_args(32), {"BLOCK": 32}, arch=80)
    assert os.environ.get("TRITON_INTERPRET") == before


def test_argument_mismatch_is_a_value_error():
    args = _dot_args(32)
    with pytest.raises(ValueError, match="missing constexpr BLOCK"):
        compile_for_gpu(_masked_dot_kernel, args, {})
    with pytest.raises(ValueError, match="no parameter"):
        compile_for_gpu(_masked_dot_kernel, {**args, "bogus": 1}, {"BLOCK": 32})
    del args["M"]
    with pytest.raises(ValueError, match="missing argument M"):
        compile_for_gpu(_masked_dot_kernel, args, {"BLOCK": 32})
