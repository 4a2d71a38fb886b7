"""Launch configurations of the EMIM kernels: the one place where block sizes, warps and stages live.

The kernels (in ``emim_triton.kernels``) take every one of these as a parameter (``tl.constexpr`` or launch option); nothing is baked
in. ``default_*_config`` are shape heuristics used until the autotuner has measured a GPU; they keep the
register-resident tiles (query tile x padded window, query tile x padded head_dim) within a budget that
compiles without spills for every supported K and D, and never use tiles much larger than the frame.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

# On a GPU tl.dot needs its inner dimension >= 16 (the interpreter accepts less); we keep every dot
# dimension (query tile, padded window, hidden chunk, padded D) >= 16 so all map onto tensor-core shapes.
MIN_DOT_DIM = 16

# Elements of the largest register-resident float32 tile (queries x padded K²) we allow by default:
# 64 x 64 = 4096 spread over 4 warps is 32 registers a thread, which leaves room for the rest.
_TILE_ELEMENT_BUDGET = 4096


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def padded_window_area(window: int) -> int:
    """K² padded to a power of two (tl.arange needs one) and to the tl.dot minimum: 49 -> 64."""
    return max(MIN_DOT_DIM, next_power_of_2(window * window))


def padded_head_dim(head_dim: int) -> int:
    """D padded to a power of two (and >= 16): 64 -> 64, 48 -> 64, 80 -> 128."""
    return max(MIN_DOT_DIM, next_power_of_2(head_dim))


@dataclass(frozen=True)
class TileConfig:
    """A spatial tile of BLOCK_H x BLOCK_W query (or key) positions of one frame pair and head.

    hidden_chunk: how many of the 4K² hidden units of the motion MLP are processed per step (the MLP is
    computed as a loop of two tl.dot's over hidden chunks so its registers stay bounded).
    """

    block_h: int
    block_w: int
    hidden_chunk: int = 32
    num_warps: int = 4
    num_stages: int = 2

    @property
    def block_q(self) -> int:
        return self.block_h * self.block_w

    def constexprs(self) -> dict:
        return dict(BLOCK_H=self.block_h, BLOCK_W=self.block_w, HIDDEN_CHUNK=self.hidden_chunk)

    def launch_options(self) -> dict:
        return dict(num_warps=self.num_warps, num_stages=self.num_stages)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class RowConfig:
    """For the weight-gradient kernel, which treats the queries as plain rows of a matrix.

    block_rows: rows per step; programs: how many programs split the rows (each writes one partial sum,
    which the host adds in a fixed order, so the result is deterministic for a given config).
    """

    block_rows: int = 64
    hidden_chunk: int = 32
    programs: int = 128
    num_warps: int = 4
    num_stages: int = 2

    def constexprs(self) -> dict:
        return dict(BLOCK_ROWS=self.block_rows, HIDDEN_CHUNK=self.hidden_chunk)

    def launch_options(self) -> dict:
        return dict(num_warps=self.num_warps, num_stages=self.num_stages)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class EMIMConfigs:
    """One configuration per kernel of the op: the forward and the three backward kernels."""

    forward: TileConfig
    backward_query: TileConfig
    backward_key_value: TileConfig
    backward_weights: RowConfig


# Query tiles above 64 positions spill registers in the AOT compile (K=5: 128 queries x 32 channels of
# q, context and the k/v rows of one displacement), so 64 is the ceiling until a GPU says otherwise.
_MAX_TILE_POSITIONS = 64


def _tile_for(height: int, width: int, window: int, budget: int) -> tuple[int, int]:
    """Largest power-of-two tile with >= 16 positions, <= budget / padded K², not much beyond the frame."""
    max_positions = max(MIN_DOT_DIM, min(_MAX_TILE_POSITIONS, budget // padded_window_area(window)))
    block_w = min(next_power_of_2(width), 16)
    block_h = min(next_power_of_2(height), 16)
    while block_h * block_w > max_positions:  # shrink the longer side first
        if block_h >= block_w:
            block_h //= 2
        else:
            block_w //= 2
    while block_h * block_w < MIN_DOT_DIM:  # tiny frames: grow to the tl.dot minimum
        if block_w <= block_h:
            block_w *= 2
        else:
            block_h *= 2
    return block_h, block_w


def default_configs(height: int, width: int, window: int, head_dim: int,
                    dtype: torch.dtype = torch.bfloat16) -> EMIMConfigs:
    """Heuristic configurations for a shape; the autotuner replaces these with measured ones.

    Each choice below was checked by compiling for sm_80 and sm_90 (tests/test_aot_compile.py prints
    registers and spills).
    """
    fwd_h, fwd_w = _tile_for(height, width, window, _TILE_ELEMENT_BUDGET)
    # The query-side backward holds four K²-wide tiles (affinities, probabilities, dP, dA): half the tile.
    bwd_h, bwd_w = _tile_for(height, width, window, _TILE_ELEMENT_BUDGET // 2)
    kv_h, kv_w = _tile_for(height, width, window, _TILE_ELEMENT_BUDGET)
    # float32 inputs use "ieee" products, which lower to FMA loops with many more live registers than
    # tensor-core dots: halve the hidden chunk (the 8 x 8 forward spills at 32, not at 16).
    exact = dtype == torch.float32
    chunk = 16 if exact else 32
    # The weights kernel keeps (hidden chunk x K²) and (D x hidden chunk) accumulators plus a
    # (rows x K²) input tile: for large windows / head dims, or exact float32 products, fewer rows per
    # step or more warps (at 4 warps and 64 rows, K=15 / D=128 and float32 K=7 / D=64 spill).
    large = padded_window_area(window) * padded_head_dim(head_dim) >= 8192
    weights = RowConfig(block_rows=32 if large else 64, hidden_chunk=chunk, num_warps=8 if (large or exact) else 4)
    return EMIMConfigs(
        forward=TileConfig(fwd_h, fwd_w, hidden_chunk=chunk),
        backward_query=TileConfig(bwd_h, bwd_w, hidden_chunk=chunk),
        backward_key_value=TileConfig(kv_h, kv_w),
        backward_weights=weights,
    )


def interpreter_configs(height: int, width: int, window: int, head_dim: int,
                        dtype: torch.dtype = torch.float32) -> EMIMConfigs:
    """Under TRITON_INTERPRET=1 there is nothing to tune: one configuration, no timing.

    The interpreter runs one program at a time in Python, so fewer, larger programs are faster: wide
    hidden chunks and only two partial sums in the weights kernel.
    """
    tiles = default_configs(height, width, window, head_dim, dtype)
    return EMIMConfigs(
        forward=TileConfig(tiles.forward.block_h, tiles.forward.block_w, hidden_chunk=64),
        backward_query=TileConfig(tiles.backward_query.block_h, tiles.backward_query.block_w, hidden_chunk=64),
        backward_key_value=tiles.backward_key_value,
        backward_weights=RowConfig(block_rows=64, hidden_chunk=64, programs=2),
    )
