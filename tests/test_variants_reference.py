"""The reference's variants (docs/operation.md#variants-beyond-the-paper, #context-channel-switch):
direction "prev", dilation, and the authors' switch, against a plain per-position loop written from docs/operation.md's
pseudo-code; its gradients, causality, and the option checks of the op on both backends."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from emim_triton import emim_attention, emim_reference
from helpers import make_inputs


def loop_emim(q, k, v, rpb, w1, b1, w2, b2, *, direction="next", dilation=1, context_channels=None,
              pad_value=1e-6):
    """docs/operation.md's per-position pseudo-code, one (t, y, x) at a time (batch and heads vectorised), in float64.

    Independent of the reference's code: no window gather, no frame-pair helper; differentiable.
    """
    q, k, v, rpb, w1, b1, w2, b2 = (t.double() for t in (q, k, v, rpb, w1, b1, w2, b2))
    B, T, H, W, heads, D = q.shape
    K = rpb.shape[-1]
    r = K // 2
    scale = D ** -0.5
    pad = torch.full((B, heads, D), pad_value, dtype=torch.float64)
    rows = []
    for t in range(T):
        if direction == "next":
            tq = min(t, T - 2) if T > 1 else 0
            tk = tq + 1 if T > 1 else 0
        else:
            tq, tk = t, max(t - 1, 0)
        for y in range(H):
            for x in range(W):
                keys, values = [], []
                for i in range(K):
                    for j in range(K):
                        yy, xx = y + (i - r) * dilation, x + (j - r) * dilation
                        inside = 0 <= yy < H and 0 <= xx < W
                        keys.append(k[:, tk, yy, xx] if inside else pad)
                        values.append(v[:, tk, yy, xx] if inside else pad)
                keys, values = torch.stack(keys, dim=2), torch.stack(values, dim=2)      # (B, heads, K², D)
                a = scale * (q[:, tq, y, x].unsqueeze(2) * keys).sum(-1) + rpb.reshape(heads, K * K)
                context = (torch.softmax(a, dim=-1).unsqueeze(-1) * values).sum(2)       # (B, heads, D)
                if context_channels is not None:
                    context = torch.cat([context[..., :context_channels],
                                         torch.zeros_like(context[..., context_channels:])], dim=-1)
                hidden = a @ w1.T + b1
                motion = (hidden * torch.sigmoid(1.702 * hidden)) @ w2.T + b2
                rows.append(context + motion)
    return torch.stack(rows, dim=1).reshape(B, T, H, W, heads, D)


def inputs64(B, T, H, W, heads, D, K, seed=0, requires_grad=False):
    values = {name: t.double().requires_grad_(requires_grad)
              for name, t in make_inputs(B, T, H, W, heads, D, K, seed=seed).items()}
    with torch.no_grad():  # a motion MLP large enough that its term is not lost next to the context
        values["w2"].mul_(20)
    return values


# (B, T, H, W, heads, D, K): T = 1, 2, 3; frames larger than, and smaller than, the dilated window.
LOOP_SHAPES = [(1, 1, 3, 4, 1, 16, 3), (1, 2, 4, 5, 2, 16, 3), (2, 3, 3, 2, 1, 16, 3), (1, 3, 5, 4, 1, 16, 5)]


@pytest.mark.parametrize("shape", LOOP_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dilation", [1, 2, 3])
@pytest.mark.parametrize("direction", ["next", "prev"])
def test_reference_equals_the_per_position_loop(direction, dilation, shape):
    x = inputs64(*shape)
    expected = loop_emim(**x, direction=direction, dilation=dilation)
    got = emim_reference(**x, direction=direction, dilation=dilation)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_variants_change_the_output():
    """The loop itself distinguishes the variants at these shapes (so the test above could fail)."""
    x = inputs64(1, 3, 4, 5, 1, 16, 3)
    plain = loop_emim(**x)
    assert not torch.allclose(plain, loop_emim(**x, direction="prev"))
    assert not torch.allclose(plain, loop_emim(**x, dilation=2))


def test_chunking_does_not_change_a_variant():
    x = inputs64(2, 3, 4, 3, 1, 16, 3)
    whole = emim_reference(**x, direction="prev", dilation=2)
    torch.testing.assert_close(emim_reference(**x, direction="prev", dilation=2, chunk_pairs=1), whole,
                               rtol=1e-14, atol=1e-14)


def test_reference_gradcheck_prev_dilated():
    x = inputs64(1, 3, 3, 4, 1, 16, 3, requires_grad=True)
    names = list(x)
    # fast_mode: checks a random projection of the Jacobian, seconds instead of half a minute.
    torch.autograd.gradcheck(lambda *t: emim_reference(**dict(zip(names, t)), direction="prev", dilation=2),
                             tuple(x.values()), eps=1e-6, atol=1e-6, fast_mode=True)


def test_prev_is_causal_in_output_and_gradients():
    """Changing frames > t leaves output frame t, and every gradient it sends to frames <= t, unchanged;
    it sends none to frames > t."""
    T, t = 4, 1
    x = inputs64(1, T, 4, 3, 2, 16, 3, seed=1, requires_grad=True)
    y = inputs64(1, T, 4, 3, 2, 16, 3, seed=2)
    perturbed = {name: value.detach().clone().requires_grad_() for name, value in x.items()}
    with torch.no_grad():
        for name in ("q", "k", "v"):
            perturbed[name][:, t + 1:] = y[name][:, t + 1:]
    upstream = torch.randn(x["q"][:, t].shape, dtype=torch.float64)

    grads = []
    for values in (x, perturbed):
        out = emim_reference(**values, direction="prev", dilation=2)
        grads.append(torch.autograd.grad((out[:, t] * upstream).sum(), list(values.values())))
        if values is x:
            first = out.detach()
        else:
            assert torch.equal(out[:, :t + 1], first[:, :t + 1])
            assert not torch.equal(out[:, t + 1:], first[:, t + 1:])  # the perturbation does reach later frames
    for name, g, g_perturbed in zip(x, *grads):
        if name in ("q", "k", "v"):
            assert torch.count_nonzero(g[:, t + 1:]) == 0, name
            assert torch.equal(g[:, :t + 1], g_perturbed[:, :t + 1]), name
        else:
            assert torch.equal(g, g_perturbed), name


def test_next_is_not_causal():
    """The causality test's premise: with the paper's pairing, frame t does see frame t + 1."""
    x = inputs64(1, 3, 4, 3, 1, 16, 3)
    changed = {**x, "k": x["k"].clone()}
    changed["k"][:, 1] += 1
    assert not torch.equal(emim_reference(**x)[:, 0], emim_reference(**changed)[:, 0])


# --- the authors' 32-channel context ------------------------------------------------------------------------

def test_authors_switch_forward():
    """Context channels >= 32 are zero (the output there is the motion term alone), channels < 32 unchanged."""
    x = inputs64(1, 3, 4, 3, 2, 48, 3)
    switched = emim_reference(**x, authors_context_channels=32, direction="prev", dilation=2)
    torch.testing.assert_close(switched, loop_emim(**x, direction="prev", dilation=2, context_channels=32),
                               rtol=1e-12, atol=1e-12)
    plain = emim_reference(**x, direction="prev", dilation=2)
    context = emim_reference(**{**x, "w2": torch.zeros_like(x["w2"]), "b2": torch.zeros_like(x["b2"])},
                             direction="prev", dilation=2)
    assert torch.equal(switched[..., :32], plain[..., :32])
    torch.testing.assert_close(switched[..., 32:], (plain - context)[..., 32:], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(switched[..., 32:], plain[..., 32:])


def test_authors_switch_backward():
    """dq, dk, dv are zero in channels >= 32 and, below, those of the switch's forward; the parameters'
    gradients are those of the switch's forward (computed here by autograd through the loop)."""
    x = inputs64(1, 2, 3, 4, 2, 48, 3, requires_grad=True)
    upstream = torch.randn(x["q"].shape, dtype=torch.float64)
    got = torch.autograd.grad((emim_reference(**x, authors_context_channels=32) * upstream).sum(), list(x.values()))
    expected = torch.autograd.grad((loop_emim(**x, context_channels=32) * upstream).sum(), list(x.values()))
    for name, g, e in zip(x, got, expected):
        if name in ("q", "k", "v"):
            assert torch.count_nonzero(g[..., 32:]) == 0, name
            torch.testing.assert_close(g[..., :32], e[..., :32], rtol=1e-10, atol=1e-12, msg=name)
            if name != "v":  # the true gradient is not zero there: the switch's backward is the authors'
                assert torch.count_nonzero(e[..., 32:]) > 0, name
        else:
            torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12, msg=name)


def test_authors_switch_changes_nothing_up_to_32_channels():
    x = inputs64(1, 2, 3, 3, 1, 32, 3, requires_grad=True)
    plain = emim_reference(**x)
    switched = emim_reference(**x, authors_context_channels=32)
    assert torch.equal(plain, switched)
    upstream = torch.randn(plain.shape, dtype=torch.float64)
    for g, h in zip(torch.autograd.grad((plain * upstream).sum(), list(x.values())),
                    torch.autograd.grad((switched * upstream).sum(), list(x.values()))):
        assert torch.equal(g, h)


# --- option checks, FLOPs -----------------------------------------------------------------------------------

BAD_OPTIONS = [
    (dict(direction="sideways"), ValueError, "direction must be one of"),
    (dict(direction=None), ValueError, "direction must be one of"),
    (dict(dilation=0), ValueError, "dilation must be an int >= 1"),
    (dict(dilation=2.0), TypeError, "dilation must be an int >= 1"),
    (dict(dilation=True), TypeError, "dilation must be an int >= 1"),
    (dict(authors_context_channels=16), ValueError, "authors_context_channels must be None"),
    (dict(authors_context_channels=True), ValueError, "authors_context_channels must be None"),
]


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("options, error, message", BAD_OPTIONS, ids=lambda o: str(o) if isinstance(o, dict) else "")
def test_bad_variant_options_are_refused_naming_them(backend, options, error, message):
    x = make_inputs(1, 2, 3, 3, 1, 16, 3)
    with pytest.raises(error, match=message):
        emim_attention(**x, backend=backend, **options)
    if backend == "reference":
        with pytest.raises(error, match=message):
            emim_reference(**x, **options)


def test_flops_do_not_depend_on_dilation():
    x = make_inputs(1, 3, 4, 4, 1, 16, 3)
    counts = []
    for dilation in (1, 3):
        with FlopCounterMode(display=False) as counter:
            emim_attention(**x, backend="reference", dilation=dilation)
        counts.append(counter.get_total_flops())
    assert counts[0] == counts[1] > 0
