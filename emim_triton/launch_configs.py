"""Launch configurations of the EMIM kernels: the one place where block sizes, warps and stages live.

The kernels (in ``emim_triton.kernels``) take every one of these as a parameter (``tl.constexpr`` or launch option); nothing is baked
in. ``default_*_config`` are shape heuristics used until the autotuner has measured a GPU; they keep the
register-resident tiles (query tile x padded window, query tile x padded head_dim) within a budget that
compiles without spills for every supported K and D, and never use tiles much larger than the frame.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from itertools import product

import torch

from .environment import STRATEGIES

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
    """One configuration per kernel of the op (the forward and the three backward kernels of the offset-loop
    strategy), and the strategy of each direction (emim_triton/strategies.py): "offset_loop" unless the
    autotuner found the tensor-core kernels faster and equal in results (their launch configurations are their
    own defaults)."""

    forward: TileConfig
    backward_query: TileConfig
    backward_key_value: TileConfig
    backward_weights: RowConfig
    forward_strategy: str = "offset_loop"
    backward_strategy: str = "offset_loop"

    def __post_init__(self):
        for name in ("forward_strategy", "backward_strategy"):
            if getattr(self, name) not in STRATEGIES:
                raise ValueError(f"EMIMConfigs: {name} must be one of {STRATEGIES}, got {getattr(self, name)!r}")


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
    # The weights kernel keeps (hidden chunk x K²) and (hidden chunk x D) accumulators and the chunk's
    # z, QuickGELU and dz tiles (chunk x rows) in registers. Chosen with the static model (emim-bench static,
    # 2026-11-30) to compile without spills for both sm_80 and sm_90 (the heuristic does not know the GPU):
    # fp16 and tf32 operands (fp16 and bf16 inputs) take 64-wide chunks over 16 rows (3 CTAs per SM on an H200;
    # 64 rows model faster there but spill on sm_80); a padded K² x D of 8192 or more (K=9, D=128) 32-wide
    # chunks over 32 rows; the
    # 256-wide window of K >= 13 needs 8 warps; float32 "ieee" products take 16-wide chunks on 8 warps.
    wide = padded_window_area(window) * padded_head_dim(head_dim) >= 8192
    if exact:
        weights = RowConfig(block_rows=32 if wide else 64, hidden_chunk=16, num_warps=8, num_stages=1)
    elif wide:
        weights = RowConfig(block_rows=32, hidden_chunk=32, num_warps=8 if padded_window_area(window) >= 256 else 4,
                            num_stages=1)
    else:
        weights = RowConfig(block_rows=16, hidden_chunk=64, num_warps=4, num_stages=1)
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


# --- The autotuner's search space ----------------------------------------------------------------------
#
# One declared space per kernel: every value the autotuner may try. `candidate_configs` prunes it for a
# shape with cheap static rules (below); the autotuner then compiles each survivor for the GPU at hand and
# drops what the compiler says does not fit (shared memory over the limit, register spills) before timing.
#
# tile_positions: query (or key) positions per program, BLOCK_H * BLOCK_W, each side a power of two and
# the sides within a factor of 4 of each other (a long thin tile re-reads most of its key halo).
# num_stages: the pipelined loops are the few hidden-chunk steps (7 at K = 7 with 32-wide chunks) and
# the weights kernel's row blocks; a third stage costs shared memory where there is little to overlap.
# The key/value kernel has no tl.dot, so it has no hidden chunk and nothing for the software pipeliner
# to stage: its hidden_chunk and num_stages stay at the heuristic's values.
SEARCH_SPACE = {
    "forward": dict(tile_positions=(16, 32, 64, 128), hidden_chunk=(16, 32, 64), num_warps=(2, 4, 8),
                    num_stages=(1, 2)),
    "backward_query": dict(tile_positions=(16, 32, 64, 128), hidden_chunk=(16, 32, 64), num_warps=(2, 4, 8),
                           num_stages=(1, 2)),
    "backward_key_value": dict(tile_positions=(16, 32, 64, 128), hidden_chunk=(32,), num_warps=(2, 4, 8),
                               num_stages=(2,)),
    "backward_weights": dict(block_rows=(32, 64, 128), hidden_chunk=(16, 32, 64), programs=(32, 128, 512),
                             num_warps=(4, 8), num_stages=(1, 2)),
}
KERNELS = tuple(SEARCH_SPACE)  # also the names of EMIMConfigs' per-kernel fields

# Static fit rules, calibrated on AOT compiles for sm_90 (bf16, K 7 and 15, D 64 and 128; no GPU needed),
# counting register-resident float32 elements per thread:
# - the query tile: rows of a padded-K² and a padded-D wide tile (affinities; q, context, k/v rows).
#   64 a thread compiled without spills (8x8 queries on 4 warps), 128 spilled (8x8 on 2 warps, 8x16 on 4);
#   below 8 most threads would idle.
# - the MLP weight tiles of a hidden chunk (W1 and W2 columns), added to the query tile: the forward
#   compiled clean up to 160 in all (one exception); the query-side backward, which holds four K²-wide tiles, spilled in
#   about half its configurations above 80 and in a few below (the compile check catches those).
# - the weights kernel keeps two chunk-wide accumulators and weight tiles plus a row block of
#   temporaries: 200 a thread compiled clean, 256 spilled.
# - shared memory: tl.dot operands staged per pipeline stage plus layout conversions of the query tile;
#   the estimates below were above every measured value, and the budget fits an A100 (163 KB per block)
#   as well as Hopper (227 KB).
# float32 inputs use exact ("ieee") products, which lower to FMA loops with more live registers: their
# budgets are 3/4 of these, and their hidden chunks at most 16 wide.
_TILE_PER_THREAD = (8, 64)  # (min, max) for the query tile alone
_TOTAL_PER_THREAD = {"forward": 160, "backward_query": 80, "backward_key_value": 64, "backward_weights": 224}
_EXACT_FACTOR = 0.75
_EXACT_MAX_CHUNK = 16
_SHARED_BYTES_BUDGET = 160 * 1024
_MIN_TILE_EFFICIENCY = 0.5  # at least half of the positions a frame's tiles cover must be in the frame
_MAX_TILE_ASPECT = 4


def _power_of_two_tiles(positions: int):
    side = 1
    while side <= positions:
        other = positions // side
        if max(side, other) <= _MAX_TILE_ASPECT * min(side, other):
            yield side, other
        side *= 2


def tile_efficiency(height: int, width: int, block_h: int, block_w: int) -> float:
    """Fraction of the positions covered by a frame's tiles that lie inside the frame."""
    tiles = -(-height // block_h) * -(-width // block_w)
    return height * width / (tiles * block_h * block_w)


@dataclass(frozen=True)
class ResourceEstimate:
    """Static estimate of what one program of a kernel needs (see the fit rules above)."""

    tile_per_thread: float  # float32 elements per thread of the query tile (the weights kernel: row block)
    total_per_thread: float  # the same plus the resident MLP weight tiles (and, for weights, accumulators)
    shared_bytes: int  # 0 for the key/value kernel, which stages nothing


def estimate_resources(kernel: str, cfg, shape) -> ResourceEstimate:
    """What `cfg` of `kernel` is estimated to need at `shape` (an `EMIMShape`); cheap, no compile."""
    window_pad, d_pad = padded_window_area(shape.window), padded_head_dim(shape.head_dim)
    threads = 32 * cfg.num_warps
    weights = cfg.hidden_chunk * (window_pad + d_pad) / threads  # W1 and W2 columns of one chunk
    if kernel == "backward_weights":
        rows = cfg.block_rows * (window_pad + d_pad + 2 * cfg.hidden_chunk) / threads
        shared = 4 * 2 * (cfg.block_rows + cfg.hidden_chunk) * (window_pad + d_pad)
        return ResourceEstimate(rows, rows + 2 * weights, shared)  # weights + same-sized accumulators
    tile = cfg.block_q * (window_pad + d_pad) / threads
    if kernel == "backward_key_value":  # no MLP, no tl.dot
        return ResourceEstimate(tile, tile, 0)
    shared = 4 * (cfg.num_stages * cfg.hidden_chunk * (window_pad + d_pad)
                  + 2 * cfg.block_q * (window_pad + cfg.hidden_chunk))
    return ResourceEstimate(tile, tile + weights, shared)


def fits_statically(kernel: str, cfg, shape, dtype: torch.dtype) -> bool:
    """Whether the static fit rules keep `cfg` (registers and shared memory within budget)."""
    need = estimate_resources(kernel, cfg, shape)
    scale = _EXACT_FACTOR if dtype == torch.float32 else 1.0
    if need.shared_bytes > _SHARED_BYTES_BUDGET or need.total_per_thread > scale * _TOTAL_PER_THREAD[kernel]:
        return False
    low, high = _TILE_PER_THREAD
    return kernel == "backward_weights" or low <= need.tile_per_thread <= scale * high


def candidate_configs(kernel: str, shape, dtype: torch.dtype = torch.bfloat16) -> list:
    """The search space of `kernel` pruned for `shape` (an `EMIMShape`): what the autotuner may time.

    Pruned by the shape (no tile that wastes more than half its positions outside the frame, every
    tl.dot dimension >= 16, no hidden chunk wider than the padded hidden layer, no more partial sums
    than row blocks) and by the static fit rules above. The heuristic's own configuration always stays,
    first, so tuning can only match or beat it. Deterministic order.
    """
    if kernel not in SEARCH_SPACE:
        raise ValueError(f"unknown kernel {kernel!r}; expected one of {KERNELS}")
    space = SEARCH_SPACE[kernel]
    heuristic = getattr(default_configs(shape.height, shape.width, shape.window, shape.head_dim, dtype), kernel)
    hidden_pad = next_power_of_2(4 * shape.window * shape.window)
    chunks = [c for c in space["hidden_chunk"] if MIN_DOT_DIM <= c <= hidden_pad]
    if dtype == torch.float32:  # exact products: the 8x8 forward spills at 32-wide chunks, not at 16
        chunks = [c for c in chunks if c <= _EXACT_MAX_CHUNK]

    if kernel == "backward_weights":
        row_blocks = -(-shape.rows // min(space["block_rows"]))
        grid = product(space["block_rows"], chunks, [p for p in space["programs"] if p <= row_blocks],
                       space["num_warps"], space["num_stages"])
        found = [RowConfig(*values) for values in grid]
    else:
        tiles = [tile for positions in space["tile_positions"] for tile in _power_of_two_tiles(positions)
                 if tile_efficiency(shape.height, shape.width, *tile) >= _MIN_TILE_EFFICIENCY]
        if kernel == "backward_key_value":
            chunks = space["hidden_chunk"]
        grid = product(tiles, chunks, space["num_warps"], space["num_stages"])
        found = [TileConfig(bh, bw, chunk, warps, stages) for (bh, bw), chunk, warps, stages in grid]
    found = [heuristic] + [cfg for cfg in found if fits_statically(kernel, cfg, shape, dtype)]
    return list(dict.fromkeys(found))  # drop the heuristic's duplicate, keep the order
