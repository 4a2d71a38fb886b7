"""EMIM backward, motion-MLP weights: dW1, db1, dW2 as deterministic partial sums.

The MLP is shared by every query and head, so its gradients are sums over all N = B*pairs*H*W*heads
query rows. The affinity rows a (written by the query kernel) and the folded upstream gradient g have
the same row order, so this kernel sees them as two plain matrices (N, K²) and (N, D):

    z = a @ W1^T + b1        h = QuickGELU(z)        dz = (g @ W2) * QuickGELU'(z)
    dW1 = sum_rows dz^T a    db1 = sum_rows dz       dW2 = sum_rows g^T h

Program (c, p) owns hidden chunk c and the row blocks p, p + P, p + 2P, ... (P = programs); it keeps its partial sums
in registers and writes them once. The host adds the P partials in a fixed order, so the result is
bit-identical run after run (no atomics).

Why the products are written transposed, (chunk, rows): z^T = W1c a^T and dz^T = W2c^T g^T come out of the
tensor cores in the layout that dW1 = dz^T a and dW2^T = h^T g take as their register operand, so a and g
are staged in shared memory once per row block and read there in both orientations, with no transposed copy
of a (rows, chunk) tile. The MLP operands (triton_backend.mlp_operand): fp16 for fp16 inputs, tf32 for bf16
(bf16 operands are too coarse for these sums), float32 with exact "ieee" products for float32; float32
accumulation, and the fast QuickGELU except for exact products.
"""

import triton
import triton.language as tl

from .common import (fast_quick_gelu_and_grad, load_w1_transposed, load_w2_columns, quick_gelu, quick_gelu_grad,
                     round_to_tf32)


@triton.jit
def _operand(x, OPERAND: tl.constexpr):
    """x as a tensor-core operand: fp16 (OPERAND "float16"), float32 rounded to tf32 ("tf32"), or float32 as it
    is ("float32", for exact "ieee" products)."""
    if OPERAND == "float16":
        x = x.to(tl.float16)
    elif OPERAND == "tf32":
        x = round_to_tf32(x, "tf32")
    return x


@triton.jit
def emim_backward_weights_kernel(
    affinity_ptr, grad_ptr, w1_ptr, b1_ptr, w2_ptr,
    dw1_partial_ptr, db1_partial_ptr, dw2_partial_ptr,
    rows, D, programs, steps,
    WINDOW: tl.constexpr, WINDOW_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, HIDDEN_CHUNK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "tf32" with tf32 operands, "ieee" with float32 ones; fp16 operands ignore it
    OPERAND: tl.constexpr,        # the MLP operands: "float16", "tf32" or "float32" (exact products)
):
    WINDOW_AREA: tl.constexpr = WINDOW * WINDOW
    HIDDEN: tl.constexpr = 4 * WINDOW_AREA

    chunk, program = tl.program_id(0), tl.program_id(1)
    units = chunk * HIDDEN_CHUNK + tl.arange(0, HIDDEN_CHUNK)
    unit_valid = units < HIDDEN
    window_cols = tl.arange(0, WINDOW_PAD)
    channels = tl.arange(0, BLOCK_D)

    w1c = _operand(tl.trans(load_w1_transposed(w1_ptr, units, window_cols, WINDOW_AREA, HIDDEN)), OPERAND)
    b1 = tl.load(b1_ptr + units, mask=unit_valid, other=0.0).to(tl.float32)
    w2ct = _operand(tl.trans(load_w2_columns(w2_ptr, units, channels, D, HIDDEN)), OPERAND)  # (chunk, D pad)

    dw1 = tl.zeros((HIDDEN_CHUNK, WINDOW_PAD), dtype=tl.float32)
    db1 = tl.zeros((HIDDEN_CHUNK,), dtype=tl.float32)
    dw2t = tl.zeros((HIDDEN_CHUNK, BLOCK_D), dtype=tl.float32)
    # Row block p + i*P starts at row (p + i*P) * BLOCK_ROWS. Offsets inside a block are int32 and loop
    # invariant; the block's start moves a scalar base pointer (64-bit: row * K² may pass 2**31, a step
    # P * BLOCK_ROWS * K² does not). Per-element 64-bit pointers, kept live across the loop, spilled registers.
    block_rows = tl.arange(0, BLOCK_ROWS)
    a_offsets = block_rows[:, None] * WINDOW_AREA + window_cols[None, :]
    g_offsets = block_rows[:, None] * D + channels[None, :]
    a_cols = window_cols[None, :] < WINDOW_AREA
    g_cols = channels[None, :] < D
    first = program * BLOCK_ROWS
    stride = programs * BLOCK_ROWS
    a_block = affinity_ptr + first * WINDOW_AREA
    g_block = grad_ptr + first * D
    rows_left = rows - first  # rows from the block's first on; `steps` = cdiv(row blocks, programs) from the
    for step in range(0, steps):  # host, so blocks past the end load nothing (row mask) and add nothing
        in_rows = block_rows[:, None] < rows_left
        a = _operand(tl.load(a_block + a_offsets, mask=in_rows & a_cols, other=0.0), OPERAND)
        g = _operand(tl.load(g_block + g_offsets, mask=in_rows & g_cols, other=0.0), OPERAND)
        zt = tl.dot(w1c, tl.trans(a), input_precision=DOT_PRECISION) + b1[:, None]  # (chunk, rows)
        if OPERAND == "float32":
            ht, gelu_grad = quick_gelu(zt), quick_gelu_grad(zt)
        else:
            ht, gelu_grad = fast_quick_gelu_and_grad(zt)
        dw2t = tl.dot(_operand(ht, OPERAND), g, dw2t, input_precision=DOT_PRECISION)
        # Rows past the end have g = 0, hence dz = 0: they add nothing to any sum.
        dzt = tl.dot(w2ct, tl.trans(g), input_precision=DOT_PRECISION) * gelu_grad
        dw1 = tl.dot(_operand(dzt, OPERAND), a, dw1, input_precision=DOT_PRECISION)
        db1 += tl.sum(dzt, axis=1)
        rows_left -= stride
        a_block += stride * WINDOW_AREA
        g_block += stride * D

    dw1_ptrs = dw1_partial_ptr + program * (HIDDEN * WINDOW_AREA) + units[:, None] * WINDOW_AREA + window_cols[None, :]
    tl.store(dw1_ptrs, dw1, mask=unit_valid[:, None] & a_cols)
    tl.store(db1_partial_ptr + program * HIDDEN + units, db1, mask=unit_valid)
    dw2_ptrs = dw2_partial_ptr + program * (D * HIDDEN) + units[:, None] + channels[None, :] * HIDDEN
    tl.store(dw2_ptrs, dw2t, mask=unit_valid[:, None] & g_cols)
