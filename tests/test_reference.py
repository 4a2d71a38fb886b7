"""The PyTorch reference against docs/operation.md, read independently: a per-position Python loop, gradcheck, and the
reference's own promises (chunking, strided views, dtypes, autocast, NaN)."""

import itertools

import pytest
import torch

from emim_triton import emim_reference
from helpers import GRAD_NAMES, REFERENCE_RTOL, TINY_SHAPES, make_inputs, relative_error

SHAPES = [pytest.param(shape, id=name) for name, shape in TINY_SHAPES]


def naive_emim(q, k, v, rpb, w1, b1, w2, b2, scale, pad_value):
    """docs/operation.md#per-position-definition, one query at a time, in float64. Slow; tiny shapes only."""
    B, T, H, W, heads, D = q.shape
    K = rpb.shape[-1]
    r = K // 2
    pad = torch.full((D,), pad_value, dtype=torch.float64)
    out = torch.empty(q.shape, dtype=torch.float64)
    for b, t, y, x, h in itertools.product(range(B), range(T), range(H), range(W), range(heads)):
        tq = 0 if T == 1 else min(t, T - 2)
        tk = 0 if T == 1 else tq + 1
        affinity, values = [], []
        for i, j in itertools.product(range(K), range(K)):
            yy, xx = y + i - r, x + j - r
            inside = 0 <= yy < H and 0 <= xx < W
            key = k[b, tk, yy, xx, h] if inside else pad
            values.append(v[b, tk, yy, xx, h] if inside else pad)
            affinity.append(scale * torch.dot(q[b, tq, y, x, h], key) + rpb[h, i, j])
        a = torch.stack(affinity)
        p = torch.exp(a - a.max())
        p = p / p.sum()
        context = (p[:, None] * torch.stack(values)).sum(0)
        z = w1 @ a + b1
        motion = w2 @ (z * torch.sigmoid(1.702 * z)) + b2
        out[b, t, y, x, h] = context + motion
    return out


def _float64(inputs):
    return {name: t.detach().double() for name, t in inputs.items()}


@pytest.mark.parametrize("shape", SHAPES)
def test_matches_a_per_position_loop_written_from_the_spec(shape):
    inputs = _float64(make_inputs(*shape, seed=sum(shape)))
    D = shape[5]
    expected = naive_emim(**inputs, scale=D ** -0.5, pad_value=1e-6)
    assert relative_error(emim_reference(**inputs), expected) < REFERENCE_RTOL[torch.float64]


def test_scale_and_pad_value_are_honoured():
    """A pad value large enough to move the result, and a non-default scale, in a frame smaller than K."""
    inputs = _float64(make_inputs(1, 2, 2, 3, 1, 16, 5, seed=4))
    expected = naive_emim(**inputs, scale=0.3, pad_value=0.5)
    actual = emim_reference(**inputs, scale=0.3, pad_value=0.5)
    assert relative_error(actual, expected) < REFERENCE_RTOL[torch.float64]
    assert relative_error(emim_reference(**inputs), expected) > 1e-3  # the defaults give something else


def test_gradcheck_in_all_eight_inputs():
    """Finite differences against autograd, w.r.t. q, k, v, rpb, w1, b1, w2, b2 together.

    fast_mode compares u^T J v for random u, v instead of the whole Jacobian: the full one needs two
    forwards per input element (~1,500 here, 15 s), fast mode well under a second; a wrong gradient
    anywhere still shows up in the random projection.
    """
    inputs = {n: t.requires_grad_() for n, t in _float64(make_inputs(1, 2, 3, 2, 1, 16, 3, seed=2)).items()}
    assert torch.autograd.gradcheck(lambda *args: emim_reference(*args), tuple(inputs.values()), fast_mode=True)


def test_chunking_does_not_change_the_result():
    inputs = _float64(make_inputs(2, 4, 3, 4, 2, 16, 3, seed=6))  # 2 x 3 = 6 frame pairs
    one_pair_per_chunk = emim_reference(**inputs, chunk_pairs=1)
    assert relative_error(one_pair_per_chunk, emim_reference(**inputs)) < REFERENCE_RTOL[torch.float64]


def test_strided_qkv_views_give_the_same_result_as_contiguous_copies():
    inputs = make_inputs(1, 3, 4, 3, 2, 16, 3, qkv_views=True, seed=3)
    assert not inputs["q"].is_contiguous()
    copies = {name: t.contiguous() for name, t in inputs.items()}
    assert torch.equal(emim_reference(**inputs), emim_reference(**copies))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp64", "fp32", "fp16", "bf16"])
def test_output_is_contiguous_in_the_dtype_of_q(dtype):
    inputs = make_inputs(1, 2, 3, 4, 2, 16, 3, dtype=dtype, qkv_views=True, seed=8)  # float32 parameters
    out = emim_reference(**inputs)
    assert out.dtype == dtype and out.is_contiguous() and out.shape == inputs["q"].shape
    assert relative_error(out, emim_reference(**_float64(inputs))) < REFERENCE_RTOL[dtype]


def test_mixed_precision_gradients_come_back_in_each_inputs_dtype():
    """bf16 activations with float32 parameters, as under autocast."""
    inputs = {n: t.requires_grad_() for n, t in make_inputs(1, 3, 4, 5, 2, 16, 3, dtype=torch.bfloat16,
                                                             seed=11).items()}
    out = emim_reference(**inputs)
    assert out.dtype == torch.bfloat16
    out.float().square().sum().backward()
    for name in GRAD_NAMES:
        t = inputs[name]
        assert t.grad is not None and t.grad.dtype == t.dtype, name
        assert torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0, name
    assert inputs["q"].dtype == torch.bfloat16 and inputs["rpb"].dtype == torch.float32


def test_autocast_does_not_lower_the_compute_precision():
    """Under autocast einsum and linear would run in bf16; the reference keeps float32 compute."""
    inputs = make_inputs(1, 3, 4, 5, 2, 16, 3, dtype=torch.bfloat16, seed=12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = emim_reference(**inputs)
    assert torch.equal(under_autocast, emim_reference(**inputs))


def test_nan_in_q_propagates_to_its_own_query_only():
    inputs = make_inputs(1, 2, 3, 3, 1, 16, 3, seed=9)
    inputs["q"][0, 0, 1, 1, 0, 0] = float("nan")
    out = emim_reference(**inputs)
    assert torch.isnan(out[0, 0, 1, 1, 0]).all()
    assert torch.isnan(out[0, 1, 1, 1, 0]).all()  # output frame T-1 copies frame T-2
    nan_rows = torch.isnan(out).any(-1)
    assert nan_rows.sum() == 2  # every other query is untouched


def test_reference_forward_of_a_full_stage3_clip_stays_memory_bounded():
    """Two UniFormer-S16 stage-3 clips (16 x 14 x 14 tokens, 5 heads, D=64, K=7): unchunked, the forward
    grows the process by ~400 MB (measured); chunked, by ~90 MB whatever the batch. Measured in a fresh
    process so the peak resident size belongs to this forward alone."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import resource, torch
        from emim_triton import emim_reference
        q, k, v = (torch.randn(2, 16, 14, 14, 5, 64) for _ in range(3))
        params = (torch.randn(5, 7, 7), torch.randn(196, 49), torch.randn(196), torch.randn(64, 196), torch.randn(64))
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        with torch.no_grad():
            emim_reference(q, k, v, *params)
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
    """)
    growth_mb = int(subprocess.run([sys.executable, "-c", script], check=True, capture_output=True,
                                   text=True).stdout.split()[-1])
    assert growth_mb < 250, f"reference forward grew the process by {growth_mb} MB"
