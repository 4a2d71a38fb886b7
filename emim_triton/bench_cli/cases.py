"""The shapes the benchmarks run: the defaults, `--shape B,T,H,W,heads,D,K`, and `--model NAME`."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..checks import HEAD_DIM_RULE, SUPPORTED_HEAD_DIMS, SUPPORTED_WINDOWS, WINDOW_RULE, EMIMShape

# The activation dtypes the commands take, by their command-line names.
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

SHAPE_FIELDS = ("B", "T", "H", "W", "heads", "D", "K")


@dataclass(frozen=True)
class BenchCase:
    """A named shape to benchmark."""

    name: str
    shape: EMIMShape
    layers: int = 1  # how many layers of a model have this shape (from --model)

    @property
    def tokens(self) -> int:
        """T * H * W: tokens per clip, the x axis of the scaling plot."""
        return self.shape.frames * self.shape.height * self.shape.width

    def describe(self) -> str:
        s = self.shape
        return f"B={s.batch} T={s.frames} {s.height}x{s.width} heads={s.heads} D={s.head_dim} K={s.window}"

    def as_dict(self) -> dict:
        s = self.shape
        return dict(name=self.name, B=s.batch, T=s.frames, H=s.height, W=s.width, heads=s.heads, D=s.head_dim,
                    K=s.window, layers=self.layers)


# The EMIM layers of EMIM-UniFormer-S16 and -B16 at 224 px, 16 frames (docs/operation.md#place-in-uniformer): S and B
# share these shapes (B is only deeper), so one case per stage covers both. Batch 32 as in training. Plus a
# generation-style clip: few videos, a large 64x64 latent map.
GPU_CASES = (
    BenchCase("uniformer-stage3", EMIMShape(32, 16, 14, 14, 5, 64, 7)),
    BenchCase("uniformer-stage4", EMIMShape(32, 16, 7, 7, 8, 64, 7)),
    BenchCase("generation-64x64", EMIMShape(2, 16, 64, 64, 8, 64, 7)),
)

# Without a GPU: the same frames, heads and window at one clip of 4 frames, so the CPU backends finish in
# seconds. The per-frame work is the same as on the GPU cases; only B and T shrink.
CPU_CASES = (
    BenchCase("uniformer-stage3-small", EMIMShape(1, 4, 14, 14, 5, 64, 7)),
    BenchCase("uniformer-stage4-small", EMIMShape(1, 4, 7, 7, 8, 64, 7)),
)


def default_cases(device: str) -> tuple[BenchCase, ...]:
    return GPU_CASES if device == "cuda" else CPU_CASES


def parse_shape(text: str) -> BenchCase:
    """"B,T,H,W,heads,D,K" -> a BenchCase; ValueError with the reason otherwise."""
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != len(SHAPE_FIELDS):
        raise ValueError(f"expected {len(SHAPE_FIELDS)} comma-separated integers {','.join(SHAPE_FIELDS)}, "
                         f"got {len(parts)} in {text!r}")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"expected integers {','.join(SHAPE_FIELDS)}, got {text!r}") from None
    B, T, H, W, heads, D, K = values
    if min(B, T, H, W, heads) < 1:
        raise ValueError(f"B, T, H, W and heads must be >= 1, got {text!r}")
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"D must be {HEAD_DIM_RULE}, got {D}")
    if K not in SUPPORTED_WINDOWS:
        raise ValueError(f"K must be {WINDOW_RULE}, got {K}")
    return BenchCase("x".join(map(str, values)), EMIMShape(B, T, H, W, heads, D, K))


def cases_from_model(name: str, batch: int = 32, frames: int | None = None,
                     img_size: int | None = None) -> tuple[BenchCase, ...]:
    """The distinct shapes of the EMIM layers of a model-zoo model, at its default input size.

    The model is built on the meta device (no memory, no arithmetic) and run once; a forward pre-hook
    on every EMIM module records what reaches it. Raises LookupError for an unknown model and
    RuntimeError if the model zoo cannot be imported.
    """
    try:
        from ..models import create_model, get_model_cfg, list_models
    except ImportError as e:
        raise RuntimeError(f"--model needs the model zoo (emim_triton.models), which does not import here: "
                           f"{e}; pass the shapes with --shape B,T,H,W,heads,D,K instead") from e
    from ..module import EMIM

    if name not in list_models():
        raise LookupError(f"unknown model {name!r}; the model zoo has: {', '.join(list_models())}")
    cfg = get_model_cfg(name)
    frames = frames or cfg["num_frames"]
    size = img_size or cfg["img_size"]
    height, width = (size, size) if isinstance(size, int) else tuple(size)

    seen: dict[EMIMShape, int] = {}

    def record(module, args, kwargs):
        x = args[0]
        if x.dim() == 5:
            B, T, H, W, _ = x.shape
        else:
            T, H, W = kwargs.get("frames", args[1] if len(args) > 1 else None)
            B = x.shape[0]
        shape = EMIMShape(int(B), int(T), int(H), int(W), module.num_heads, module.head_dim, module.window)
        seen[shape] = seen.get(shape, 0) + 1

    with torch.device("meta"):
        model = create_model(name, num_frames=frames, img_size=size)
    hooks = [m.register_forward_pre_hook(record, with_kwargs=True) for m in model.modules() if isinstance(m, EMIM)]
    if not hooks:
        raise LookupError(f"model {name!r} has no EMIM layers to benchmark")
    try:
        with torch.no_grad():
            model(torch.empty(batch, 3, frames, height, width, device="meta"))
    finally:
        for hook in hooks:
            hook.remove()
    return tuple(BenchCase(f"{name}-{s.height}x{s.width}", s, layers) for s, layers in seen.items())
