"""`convert_to_emim`: swap some global-attention layers of a user's video transformer for EMIM.

The EMIM authors' fine-tuning recipe as one call: take a pretrained video transformer, replace every other
attention layer by EMIM, keep the replaced layers' q/k/v and output projections, start the motion MLP at
zero (so each converted layer is exactly local next-frame attention over the pretrained projections), and
fine-tune.

    report = convert_to_emim(model, grid=(8, 14, 14))      # VideoMAE-B, 16 frames, tubelet 2, 224 px
    print(report)

Attention layouts recognised (a module matching one is an "attention layer"; its children are not searched):

    emim        an EMIM module already                      counted, never converted again
    uniformer   this project's UniFormer GlobalAttention    -> EMIM; the block passes frames=(T, H, W)
    timm        qkv = Linear(C, 3C), proj = Linear(C, C),   -> GridEMIM (same parameter names: qkv, proj)
                num_heads                                   timm's Attention, most ViT code bases
    hf-split    .attention.{query,key,value} Linears and    -> GridEMIM replacing the parent, returns a tensor
                .output.dense (VideoMAEAttention)           Hugging Face VideoMAE
    hf-proj     q_proj, k_proj, v_proj, o_proj Linears      -> GridEMIM, returns (output, None)
                (ViTAttention, VivitAttention)              Hugging Face ViT, ViViT
The two Hugging Face layouts and their return values are those of transformers 5.

Extra tokens: a layer whose input has ``prefix_tokens`` tokens before the T*H*W patch tokens (a class
token) is converted with those tokens kept on global attention, see `EMIM`'s ``num_prefix_tokens``.

Nothing is dropped: a converted layer takes over every parameter and buffer of the module it replaces, or
the conversion is refused with those it cannot take over named (see `refuse_what_is_not_taken_over`).
Separate q/k/v biases beside a bias-free ``qkv`` (timm's BEiT and EVA) are added into EMIM's qkv bias;
relative position biases (BEiT's ``relative_position_bias_table``, timm's RelPos ``rel_pos``) and Swin's
window attention are refused, before any layer of the model is replaced.

Saving a converted model: its state dict holds EMIM's parameters (``qkv``, ``proj``, ``rpb``,
``motion_conv``) where the original had its attention's, so it loads only into a model converted the same
way. Hugging Face's ``save_pretrained`` / ``from_pretrained`` do not round-trip it: ``from_pretrained``
builds the original architecture, reports the EMIM weights as unexpected keys and leaves the converted
layers' attention randomly initialised (and ``save_pretrained`` renames some keys of the layers it knows,
e.g. VideoMAE's query.bias to q_bias, so its file is no plain state dict either). Save the state dict, and
reload by rebuilding the model, converting it with the same arguments, then loading it::

    torch.save(model.state_dict(), "converted.pt")
    model.config.save_pretrained("converted")                  # Hugging Face: the architecture

    model = VideoMAEForVideoClassification(VideoMAEConfig.from_pretrained("converted"))
    convert_to_emim(model, grid=(8, 14, 14))                   # the same arguments as before
    model.load_state_dict(torch.load("converted.pt"))          # strict: every key must match
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .checks import check_variant
from .module import EMIM
from .takeover import SEPARATE_BIASES, refuse_what_is_not_taken_over

Grid = tuple[int, int, int]


class GridEMIM(EMIM):
    """EMIM bound to a fixed token grid, callable like the attention layer it replaces.

    The replaced layers' callers pass only the tokens (plus, in Hugging Face models, flags), never the
    frame layout, so the grid (T, H, W) is fixed at conversion. ``returns_tuple`` mirrors Hugging Face
    attention modules that return ``(output, attention_weights)``; the weights are None (EMIM never forms
    the probabilities).
    """

    def __init__(self, *args, grid: Grid, returns_tuple: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.grid = tuple(int(n) for n in grid)
        self.returns_tuple = returns_tuple

    def forward(self, x: torch.Tensor, *args, frames: Grid | None = None, **kwargs):
        # Masks or position tensors change what attention computes; EMIM cannot honour them, so a call
        # that passes one is an error rather than silently different maths. Flags (non-tensors) are fine.
        passed = [f"positional {i + 1}" for i, a in enumerate(args) if isinstance(a, torch.Tensor)] + \
                 [name for name, value in kwargs.items() if isinstance(value, torch.Tensor)]
        if passed:
            raise ValueError(f"GridEMIM: got extra tensor arguments {passed} (an attention mask or position "
                             f"embeddings?); a converted EMIM layer takes only the tokens")
        frames = self.grid if frames is None else frames
        patches = frames[0] * frames[1] * frames[2]
        if x.dim() == 3 and x.shape[1] != patches + self.num_prefix_tokens:
            raise ValueError(
                f"GridEMIM: got {x.shape[1]} tokens, but the grid (T, H, W) = {tuple(frames)} has {patches} "
                f"patch tokens plus {self.num_prefix_tokens} prefix tokens; a model with a class token (or other "
                f"tokens before the patches) is converted with convert_to_emim(..., prefix_tokens=n), and "
                f"token dropping (e.g. VideoMAE pre-training masks) cannot run through EMIM")
        out = super().forward(x, frames=frames)
        return (out, None) if self.returns_tuple else out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, grid={self.grid}"


@dataclass(frozen=True)
class AttentionLayer:
    """An attention layer found in the model: its position among those found, name and layout."""

    index: int
    name: str
    layout: str
    module: nn.Module


@dataclass
class ConversionReport:
    """What `convert_to_emim` did: the converted layers and, for every other attention layer, why not."""

    converted: list[dict] = field(default_factory=list)   # name, index, layout, dim, heads, grid, prefix
    skipped: list[dict] = field(default_factory=list)     # name, index, layout, reason

    def __str__(self) -> str:
        lines = [f"converted {len(self.converted)} of {len(self.converted) + len(self.skipped)} attention "
                 f"layers to EMIM"]
        for layer in sorted(self.converted + self.skipped, key=lambda entry: entry["index"]):
            if "reason" in layer:
                lines.append(f"  [{layer['index']}] {layer['name']} ({layer['layout']}): kept, {layer['reason']}")
            else:
                grid = layer["grid"] or "(T, H, W) passed by the block"
                prefix = f", {layer['prefix_tokens']} prefix tokens on global attention" \
                    if layer["prefix_tokens"] else ""
                lines.append(f"  [{layer['index']}] {layer['name']} ({layer['layout']}): -> EMIM, "
                             f"{layer['heads']} heads x {layer['dim'] // layer['heads']}, grid {grid}{prefix}")
        return "\n".join(lines)


def convert_to_emim(model: nn.Module, grid: Grid | Callable[[str], Grid] | None = None, every: int = 2,
                    window: int = 7, layers: Sequence[int | str] | None = None, backend: str = "auto",
                    prefix_tokens: int | None = None, direction: str = "next", dilation: int = 1,
                    authors_context_channels: int | None = None, **emim_kwargs) -> ConversionReport:
    """Replace attention layers of ``model`` in place by EMIM modules that take over their weights.

    Args:
        model: any nn.Module; its attention layers are found by layout (see the module docstring).
        grid: the token grid (T, H, W) the attention layers see, the patch tokens in (t, y, x) order
            (VideoMAE-B at 16 x 224: tubelet 2, patch 16 -> (8, 14, 14)); or a callable taking the
            layer's name and returning its grid. Not needed for UniFormer blocks, which pass their
            frames at run time.
        every: convert attention layers 0, every, 2*every, ... in the order they were found (2: the
            authors' alternation of local EMIM and global layers). Layers that are EMIM already count in
            that order and stay as they are. Ignored when ``layers`` is given.
        window: EMIM window K (odd, 3..15).
        layers: explicit choice: indices into the found attention layers, or their module names.
        backend: the EMIM op's backend: "auto" (fused kernels on CUDA, reference on CPU), "triton",
            "reference".
        prefix_tokens: tokens before the patch tokens (a class token: 1). Default: the model's
            ``num_prefix_tokens`` attribute (timm ViTs have one), else 0. They keep global attention.
        direction: the converted layers' frame pairing: "next" (the paper) or "prev" (each converted layer
            causal; see `EMIM`).
        dilation: the converted layers' window dilation, an int >= 1.
        authors_context_channels: None, or 32 for the authors' 32-channel context (see `EMIM`).
        **emim_kwargs: further `EMIM` arguments (e.g. ``pad_value``).
    Returns:
        a `ConversionReport`; ``print(report)`` lists each attention layer and what happened to it.
    Raises:
        ValueError: no attention layer of a known layout; an unknown entry in ``layers``; or a selected
            layer EMIM cannot represent (q/k normalisation, attention dropout, head_dim outside 16..128,
            no grid, Swin window attention, a parameter or buffer EMIM cannot take over such as a relative
            position bias). Nothing is replaced then: the model is converted whole or not at all.
    """
    if prefix_tokens is None:
        prefix_tokens = int(getattr(model, "num_prefix_tokens", 0) or 0)
    try:  # checked once here, so a bad option is not reported as a failure to convert the first layer
        check_variant(direction, dilation, authors_context_channels)
    except (TypeError, ValueError) as error:
        raise type(error)(f"convert_to_emim: {error}") from error
    emim_kwargs.update(direction=direction, dilation=dilation, authors_context_channels=authors_context_channels)
    if _layout_of(model) is not None:
        raise ValueError(f"convert_to_emim: {type(model).__name__} is itself an attention layer; it replaces "
                         f"layers inside a model: wrap it (e.g. nn.Sequential(layer)), or use EMIM.from_attention")
    found = find_attention_layers(model)
    if not found:
        raise ValueError(f"convert_to_emim: found no attention layer in {type(model).__name__}; recognised "
                         f"layouts: timm-style (qkv, proj, num_heads), Hugging Face (query/key/value + "
                         f"output.dense, or q_proj/k_proj/v_proj/o_proj), UniFormer GlobalAttention")
    chosen = _select(found, every, layers)

    report = ConversionReport()
    replacements = []
    for layer in found:
        if layer.layout == "emim":
            report.skipped.append(_skip(layer, "already EMIM"))
        elif layer.index not in chosen:
            why = "not in layers" if layers is not None else f"not selected by every={every}"
            report.skipped.append(_skip(layer, why))
        else:
            layer_grid = None if layer.layout == "uniformer" else _grid_for(layer, grid)
            try:
                emim = _build(layer, layer_grid, window=window, backend=backend, prefix_tokens=prefix_tokens,
                              **emim_kwargs)
            except ValueError as error:
                raise ValueError(f"convert_to_emim: cannot convert {layer.name!r} ({layer.layout} layout, "
                                 f"{type(layer.module).__name__}): {error}") from error
            replacements.append((layer.name, emim))
            report.converted.append(dict(name=layer.name, index=layer.index, layout=layer.layout, dim=emim.dim,
                                         heads=emim.num_heads, grid=layer_grid,
                                         prefix_tokens=emim.num_prefix_tokens))
    # Every replacement was built (and every refusal raised) before the first one is installed.
    for name, emim in replacements:
        model.set_submodule(name, emim)
    return report


def find_attention_layers(model: nn.Module) -> list[AttentionLayer]:
    """The attention layers of ``model`` in module order, with their layouts (children of a match skipped)."""
    found, matched = [], []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in matched):
            continue
        layout = _layout_of(module)
        if layout is not None and name:  # the model itself is never replaced: set_submodule needs a name
            found.append(AttentionLayer(len(found), name, layout, module))
            matched.append(name)
    return found


def _layout_of(module: nn.Module) -> str | None:
    if isinstance(module, EMIM):
        return "emim"
    from .models.uniformer import GlobalAttention  # here: the model zoo itself imports this package

    if isinstance(module, GlobalAttention):
        return "uniformer"
    if _linears(module, "qkv", "proj") and isinstance(getattr(module, "num_heads", None), int):
        return "timm"
    inner, output = getattr(module, "attention", None), getattr(module, "output", None)
    if inner is not None and output is not None and _linears(inner, "query", "key", "value") \
            and _linears(output, "dense"):
        return "hf-split"
    if _linears(module, "q_proj", "k_proj", "v_proj", "o_proj"):
        return "hf-proj"
    return None


def _linears(module: nn.Module, *names: str) -> bool:
    return all(isinstance(getattr(module, name, None), nn.Linear) for name in names)


def _select(found: list[AttentionLayer], every: int, layers) -> set[int]:
    if layers is None:
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"convert_to_emim: every must be an int >= 1, got {every!r}")
        return {layer.index for layer in found if layer.index % every == 0}
    by_name = {layer.name: layer.index for layer in found}
    chosen = set()
    for entry in layers:
        if isinstance(entry, str) and entry in by_name:
            chosen.add(by_name[entry])
        elif isinstance(entry, int) and not isinstance(entry, bool) and 0 <= entry < len(found):
            chosen.add(entry)
        else:
            listing = ", ".join(f"[{layer.index}] {layer.name}" for layer in found)
            raise ValueError(f"convert_to_emim: layers entry {entry!r} is neither an index nor the name of an "
                             f"attention layer; found: {listing}")
    return chosen


def _grid_for(layer: AttentionLayer, grid) -> Grid:
    value = grid(layer.name) if callable(grid) else grid
    if value is None:
        raise ValueError(f"convert_to_emim: {layer.name!r} ({layer.layout} layout) is called with tokens only, "
                         f"so the token grid must be given: pass grid=(T, H, W) or a callable name -> grid")
    if len(value) != 3 or not all(isinstance(n, int) and n >= 1 for n in value):
        raise ValueError(f"convert_to_emim: the grid of {layer.name!r} must be three positive ints (T, H, W), "
                         f"got {value!r}")
    return tuple(value)


def _skip(layer: AttentionLayer, reason: str) -> dict:
    return dict(name=layer.name, index=layer.index, layout=layer.layout, reason=reason)


# ----------------------------------------------------------------------------------------------------
# Building the EMIM module of one layer
# ----------------------------------------------------------------------------------------------------

def _build(layer: AttentionLayer, grid: Grid | None, *, window: int, backend: str, prefix_tokens: int,
           **kwargs) -> EMIM:
    module = layer.module
    _refuse_unsupported(module if layer.layout != "hf-split" else module.attention)
    refuse_what_is_not_taken_over(module, layer.layout)
    if layer.layout == "uniformer":  # the UniFormer block passes frames itself and has no class token
        emim = EMIM.from_attention(module, window=window, backend=backend, **kwargs)
    elif layer.layout == "timm":
        emim = GridEMIM.from_attention(module, window=window, backend=backend, grid=grid,
                                       num_prefix_tokens=prefix_tokens, **kwargs)
    elif layer.layout == "hf-split":
        inner = module.attention
        emim = _from_projections(
            inner.query, inner.key, inner.value, module.output.dense,
            num_heads=inner.num_attention_heads, scale=getattr(inner, "scaling", None),
            proj_drop=_dropout_rate(module.output, "dropout"),
            # VideoMAE before transformers 5 kept q and v biases as separate parameters (k has none).
            extra_biases=tuple(getattr(inner, name, None) for name in SEPARATE_BIASES),
            window=window, backend=backend, grid=grid, num_prefix_tokens=prefix_tokens, **kwargs)
    else:  # hf-proj
        heads = getattr(module, "num_attention_heads", getattr(module, "num_heads", None))
        emim = _from_projections(module.q_proj, module.k_proj, module.v_proj, module.o_proj, num_heads=heads,
                                 scale=getattr(module, "scaling", None), proj_drop=0.0, returns_tuple=True,
                                 window=window, backend=backend, grid=grid, num_prefix_tokens=prefix_tokens,
                                 **kwargs)
    emim.train(module.training)
    return emim


def _refuse_unsupported(attn: nn.Module) -> None:
    """Parts of an attention layer EMIM has no place for: refused, never silently dropped."""
    for part in ("q_norm", "k_norm", "norm"):
        norm = getattr(attn, part, None)
        if isinstance(norm, nn.Module) and not isinstance(norm, nn.Identity):
            raise ValueError(f"{part} is {type(norm).__name__}; EMIM has no place for a normalisation inside "
                             f"the attention (only nn.Identity can be taken over)")
    for part in ("attn_drop", "dropout_prob", "attention_dropout"):
        rate = _dropout_rate(attn, part)
        if rate != 0:
            raise ValueError(f"attention dropout {part} = {rate}; EMIM has none (the fused kernels never hold "
                             f"the probabilities); set it to 0 before converting")


def _dropout_rate(module: nn.Module, name: str) -> float:
    """The rate of a dropout attribute, an nn.Dropout or a plain float; 0 if there is none."""
    value = getattr(module, name, None)
    rate = value.p if isinstance(value, nn.Dropout) else value
    return float(rate) if isinstance(rate, (int, float)) else 0.0


def _from_projections(query: nn.Linear, key: nn.Linear, value: nn.Linear, out: nn.Linear, *, num_heads,
                      scale, proj_drop: float, extra_biases=(None, None, None), **kwargs) -> GridEMIM:
    """A GridEMIM whose qkv is [query; key; value] stacked (the order EMIM splits them in) and proj = out.

    A projection without a bias gets a zero bias, the same function (VideoMAE's key has none).
    """
    dim = query.in_features
    shapes = [(p.in_features, p.out_features) for p in (query, key, value, out)]
    if any(shape != (dim, dim) for shape in shapes):
        raise ValueError(f"expected query, key, value and output projections Linear({dim}, {dim}), got "
                         f"(in, out) = {shapes}; EMIM needs heads * head_dim = C")
    if not isinstance(num_heads, int):
        raise ValueError("no integer num_attention_heads / num_heads attribute")
    biases = [_sum_biases(p.bias, extra) for p, extra in zip((query, key, value), extra_biases)]
    qkv_bias = any(b is not None for b in biases)

    emim = GridEMIM(dim, num_heads, qkv_bias=qkv_bias, qk_scale=None if scale is None else float(scale),
                    proj_drop=proj_drop, **kwargs)
    weight = query.weight
    emim.to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        emim.qkv.weight.copy_(torch.cat([query.weight, key.weight, value.weight]))
        if qkv_bias:
            emim.qkv.bias.copy_(torch.cat([b if b is not None else weight.new_zeros(dim) for b in biases]))
        emim.proj.weight.copy_(out.weight)
        emim.proj.bias.copy_(out.bias if out.bias is not None else torch.zeros_like(emim.proj.bias))
    return emim


def _sum_biases(*biases):
    present = [b for b in biases if b is not None]
    return sum(present[1:], present[0]) if present else None
