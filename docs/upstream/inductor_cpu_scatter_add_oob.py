"""Inductor (CPU) scatter-add with transposed values writes out of bounds when the kernel runs in parallel.

Standalone, needs only torch. Run: python inductor_cpu_scatter_add_oob.py [1|2]   (default: both cases)
Expected: "max |compiled - eager| = 0.0" for each case.
Seen with torch 2.13.0+cpu, 2 threads, AMD EPYC (AVX-512): the process aborts ("free(): invalid size",
"double free or corruption (!prev)", "malloc_consolidate(): invalid chunk size"; exit status 134, or
139 from a segmentation fault), sometimes after printing a large difference. With torch.set_num_threads(1)
both cases print 0.0.

What goes wrong (TORCH_LOGS=output_code): index_put(out, [None, arange(16)], v.t(), accumulate=True)
is generated as a 2-D tiled loop (the values are read transposed) that adds with atomic_add_vec, the
path taken for parallel kernels. The index of that atomic add counts the inner tile variable twice,
`x1 + 16*x0 + 32*x0_inner` where the row stride is 16, so it adds past the end of the output buffer.
This matches pytorch/pytorch#191837 (the same abort from an F.fold backward; closed) and the fix
proposed in pytorch/pytorch#191861 (the tile2d store applies its index transform twice on the
atomic_add path).

How a model meets it: Tensor.unfold's backward (aten.unfold_backward) decomposes into this
index_put(accumulate=True) with an iota index, so the backward of a local-attention window gather
(x.unfold(...).permute(...), case 2) aborts the process under torch.compile.
"""

import sys

import torch

torch.set_num_threads(max(2, torch.get_num_threads()))  # the atomic (parallel) path; 1 thread is fine


def scatter_add_transposed(v):
    """Case 1, forward only: out (16, 16) with out[:, j] += v.t()[:, j]; the index built in the graph."""
    return torch.ops.aten.index_put(torch.zeros(16, 16), [None, torch.arange(16)], v.t(), True)


def window_gather_loss(x, w):
    """Case 2, through autograd: sum(w * windows) where windows = x.unfold(1, 3, 1).permute(1, 2, 3, 0)."""
    return (x.unfold(1, 3, 1).permute(1, 2, 3, 0) * w).sum()


cases = sys.argv[1:] or ["1", "2"]
torch.manual_seed(0)
if "1" in cases:
    v = torch.randn(16, 16)
    got = torch.compile(scatter_add_transposed, fullgraph=True)(v)
    print("case 1, scatter-add: max |compiled - eager| =",
          (got - scatter_add_transposed(v)).abs().max().item(), flush=True)
if "2" in cases:
    x = torch.randn(2, 4, 4, requires_grad=True)
    w = torch.randn(2, 4, 3, 2)
    (grad_compiled,) = torch.autograd.grad(torch.compile(window_gather_loss, fullgraph=True)(x, w), x)
    (grad_eager,) = torch.autograd.grad(window_gather_loss(x, w), x)
    print("case 2, unfold backward: max |compiled - eager| =",
          (grad_compiled - grad_eager).abs().max().item(), flush=True)
