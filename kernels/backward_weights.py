"""EMIM backward, motion-MLP weights: dW1, db1, dW2 as deterministic partial sums.

The MLP is shared by every query and head, so its gradients are sums over all N = B*pairs*H*W*heads
query rows. The affinity rows a (written by the query kernel) and the folded upstream gradient g have
the same row order, so this kernel sees them as two plain matrices (N, K²) and (N, D):

    z = a @ W1^T + b1        h = QuickGELU(z)        dz = (g @ W2) * QuickGELU'(z)
    dW1 = sum_rows dz^T a    db1 = sum_rows dz       dW2 = sum_rows g^T h

Program (c, p) owns hidden chunk c and the row blocks p, p + P, p + 2P, ... (P = programs); it keeps its partial sums
in registers and writes them once. The host adds the P partials in a fixed order, so the result is
bit-identical run after run (no atomics).
"""

import triton
import triton.language as tl

from .common import load_w1_transposed, load_w2_columns, mlp_dot, quick_gelu, quick_gelu_grad


@triton.jit
def emim_backward_weights_kernel(
    affinity_ptr, grad_ptr, w1_ptr, b1_ptr, w2_ptr,
    dw1_partial_ptr, db1_partial_ptr, dw2_partial_ptr,
    rows, D, programs, steps,
    WINDOW: tl.constexpr, WINDOW_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, HIDDEN_CHUNK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    WINDOW_AREA: tl.constexpr = WINDOW * WINDOW
    HIDDEN: tl.constexpr = 4 * WINDOW_AREA

    chunk, program = tl.program_id(0), tl.program_id(1)
    units = chunk * HIDDEN_CHUNK + tl.arange(0, HIDDEN_CHUNK)
    unit_valid = units < HIDDEN
    window_cols = tl.arange(0, WINDOW_PAD)
    channels = tl.arange(0, BLOCK_D)

    w1t = load_w1_transposed(w1_ptr, units, window_cols, WINDOW_AREA, HIDDEN)  # (K² pad, chunk)
    b1 = tl.load(b1_ptr + units, mask=unit_valid, other=0.0).to(tl.float32)
    w2c = load_w2_columns(w2_ptr, units, channels, D, HIDDEN)  # (D pad, chunk)

    dw1 = tl.zeros((HIDDEN_CHUNK, WINDOW_PAD), dtype=tl.float32)
    db1 = tl.zeros((HIDDEN_CHUNK,), dtype=tl.float32)
    dw2 = tl.zeros((BLOCK_D, HIDDEN_CHUNK), dtype=tl.float32)
    # Row blocks program, program + programs, ...: `steps` = cdiv(row blocks, programs) from the host;
    # blocks past the end load nothing (row mask) and add nothing.
    for step in range(0, steps):
        block = program + step * programs
        row = tl.arange(0, BLOCK_ROWS).to(tl.int64) + block * BLOCK_ROWS  # int64: row * K² may pass 2**31
        row_valid = row < rows
        a = tl.load(affinity_ptr + row[:, None] * WINDOW_AREA + window_cols[None, :],
                    mask=row_valid[:, None] & (window_cols[None, :] < WINDOW_AREA), other=0.0)
        g = tl.load(grad_ptr + row[:, None] * D + channels[None, :],
                    mask=row_valid[:, None] & (channels[None, :] < D), other=0.0)
        z = mlp_dot(a, w1t, DOT_PRECISION) + b1[None, :]
        # Rows past the end have g = 0, hence dz = 0: they add nothing to any sum below.
        dz = mlp_dot(g, w2c, DOT_PRECISION) * quick_gelu_grad(z)
        dw1 += mlp_dot(tl.trans(dz), a, DOT_PRECISION)
        db1 += tl.sum(dz, axis=0)
        dw2 += mlp_dot(tl.trans(g), quick_gelu(z), DOT_PRECISION)

    dw1_ptrs = dw1_partial_ptr + program * (HIDDEN * WINDOW_AREA) + units[:, None] * WINDOW_AREA + window_cols[None, :]
    tl.store(dw1_ptrs, dw1, mask=unit_valid[:, None] & (window_cols[None, :] < WINDOW_AREA))
    tl.store(db1_partial_ptr + program * HIDDEN + units, db1, mask=unit_valid)
    dw2_ptrs = dw2_partial_ptr + program * (D * HIDDEN) + channels[:, None] * HIDDEN + units[None, :]
    tl.store(dw2_ptrs, dw2, mask=(channels[:, None] < D) & unit_valid[None, :])
