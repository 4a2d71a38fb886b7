"""Every tensor the op accepts may come in any layout: each of the eight inputs non-contiguous in turn
(transposed, sliced, expanded where that is legal) gives the contiguous call's output and gradients, on both
backends.

The fused kernels index the five parameters by raw offsets; before the launcher made them dense, a
transposed rpb or W1 was read in the wrong order and the output was off by 27-129 % with no error.
"""

import pytest
import torch

from emim_triton import emim_attention
from helpers import GRAD_NAMES, make_inputs, relative_error, test_device
from layouts import constant_along_first_axis, relaid

DEVICE = test_device()
SHAPE = (2, 2, 3, 4, 2, 16, 3)  # B = 2 and heads = 2 so that every axis has a stride that matters

# (tensor, layout): all eight tensors sliced, all but the two vectors transposed (a 1-D transpose is itself);
# expanded where a stride-0 tensor is legal (q, v along the batch; a bias vector), after making the values
# constant along that axis.
CASES = [(name, "transposed") for name in GRAD_NAMES if name not in ("b1", "b2")]
CASES += [(name, "sliced") for name in GRAD_NAMES]
CASES += [("q", "expanded"), ("v", "expanded"), ("b1", "expanded"), ("b2", "expanded")]


def _forward_and_grads(inputs, backend):
    leaves = {n: t.requires_grad_() for n, t in inputs.items()}
    out = emim_attention(**leaves, backend=backend)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
    return out, torch.autograd.grad(out, list(leaves.values()), grad_out)


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=pytest.mark.fused)])
@pytest.mark.parametrize("name,layout", CASES, ids=[f"{n}-{lay}" for n, lay in CASES])
def test_non_contiguous_input_gives_the_contiguous_result(backend, name, layout):
    inputs = make_inputs(*SHAPE, device=DEVICE, seed=4)
    if layout == "expanded":
        inputs[name] = constant_along_first_axis(inputs[name])
    contiguous = {n: t.detach().clone() for n, t in inputs.items()}
    strided = {n: t.detach().clone() for n, t in inputs.items()}
    strided[name] = relaid(inputs[name], layout)
    assert not strided[name].is_contiguous() and torch.equal(strided[name], contiguous[name])

    out, grads = _forward_and_grads(contiguous, backend)
    strided_out, strided_grads = _forward_and_grads(strided, backend)
    assert relative_error(strided_out, out) < 1e-6
    for grad_name, grad, strided_grad in zip(GRAD_NAMES, grads, strided_grads):
        assert strided_grad.shape == grad.shape, grad_name
        assert relative_error(strided_grad, grad) < 1e-6, grad_name
