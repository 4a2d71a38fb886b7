"""Pictures of motion fields: the optical-flow colour coding, arrows, and the files `emim-viz` writes.

Colour coding: the colour wheel of the Middlebury optical-flow benchmark (Baker et al., "A Database and
Evaluation Methodology for Optical Flow", 2007), the convention flow papers use: the hue gives the direction
of motion (right red, down yellow, left cyan, up blue: the legend each picture carries), the saturation its length
relative to the largest in the field; white is no motion. Drawn with Pillow and numpy only.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .motion_field import MotionField

PICTURES = ("flow.png", "arrows.png", "motion.gif")  # what write_pictures writes into its folder

# The wheel's hue ramps, in order around the circle: (number of steps, start colour, end colour). Unequal
# step counts make perceptually similar hue differences take similar angles (the benchmark's choice).
_WHEEL_RAMPS = (
    (15, (1, 0, 0), (1, 1, 0)),   # red -> yellow
    (6, (1, 1, 0), (0, 1, 0)),    # yellow -> green
    (4, (0, 1, 0), (0, 1, 1)),    # green -> cyan
    (11, (0, 1, 1), (0, 0, 1)),   # cyan -> blue
    (13, (0, 0, 1), (1, 0, 1)),   # blue -> magenta
    (6, (1, 0, 1), (1, 0, 0)),    # magenta -> red
)
_TITLE_HEIGHT = 30
_BACKGROUND = (255, 255, 255)


def colour_wheel() -> np.ndarray:
    """(55, 3) float colours in 0..1, going once around the hue circle."""
    ramps = []
    for steps, start, end in _WHEEL_RAMPS:
        start, end = np.array(start, float), np.array(end, float)
        ramps.append(start + (np.arange(steps)[:, None] / steps) * (end - start))
    return np.concatenate(ramps)


def flow_to_rgb(flow: np.ndarray, max_magnitude: float) -> np.ndarray:
    """(..., 2) displacements (dy, dx), y down -> (..., 3) uint8 colours.

    The angle of (dx, dy) picks a wheel colour (interpolated between its two nearest entries); the length
    divided by ``max_magnitude`` blends it from white (0) to full colour (1); longer is darkened.
    """
    wheel = colour_wheel()
    dy, dx = flow[..., 0] / max_magnitude, flow[..., 1] / max_magnitude
    radius = np.hypot(dx, dy)
    position = (np.arctan2(-dy, -dx) / np.pi + 1) / 2 * (len(wheel) - 1)  # 0..54 around the circle
    lower = np.floor(position).astype(int)
    upper = (lower + 1) % len(wheel)
    weight = (position - lower)[..., None]
    colour = (1 - weight) * wheel[lower] + weight * wheel[upper]
    inside = (radius <= 1)[..., None]
    colour = np.where(inside, 1 - radius[..., None] * (1 - colour), 0.75 * colour)
    return np.round(255 * colour).astype(np.uint8)


def legend(size: int) -> Image.Image:
    """The colour wheel as a disc: each point is coloured as a displacement from the centre to it, with the
    full radius standing for the field's largest displacement."""
    centre = (size - 1) / 2
    radius = size / 2 - 2
    y, x = np.mgrid[0:size, 0:size]
    flow = np.stack([(y - centre) / radius, (x - centre) / radius], axis=-1)
    rgb = flow_to_rgb(flow, 1.0)
    rgb[np.hypot(*np.moveaxis(flow, -1, 0)) > 1] = _BACKGROUND
    image = Image.fromarray(rgb)
    draw = ImageDraw.Draw(image)
    font = _font(10)
    draw.text((size - 2, centre), "x", fill=(0, 0, 0), font=font, anchor="rm")
    draw.text((centre, size - 2), "y", fill=(0, 0, 0), font=font, anchor="mb")
    return image


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def draw_arrows(image: Image.Image, flow: np.ndarray, gain: float, colour, outline=None) -> None:
    """Draw one arrow per token of an (h, w, 2) field of (dy, dx): from the token's centre, ``gain`` pixels
    per token of displacement. Arrows shorter than a pixel are left out."""
    draw = ImageDraw.Draw(image)
    h, w = flow.shape[:2]
    cell_y, cell_x = image.height / h, image.width / w
    for y in range(h):
        for x in range(w):
            dy, dx = flow[y, x] * gain
            length = float(np.hypot(dx, dy))
            if length < 1:
                continue
            start = ((x + 0.5) * cell_x, (y + 0.5) * cell_y)
            end = (start[0] + dx, start[1] + dy)
            head = max(2.0, 0.35 * length)
            angle = np.arctan2(dy, dx)
            barbs = [(end[0] - head * np.cos(angle + s), end[1] - head * np.sin(angle + s)) for s in (0.45, -0.45)]
            for width, fill in ((3, outline), (1, colour)):  # an outline keeps arrows visible on any image
                if fill is None:
                    continue
                draw.line([start, end], fill=fill, width=width)
                for barb in barbs:
                    draw.line([end, barb], fill=fill, width=width)


def _panel(rgb: np.ndarray, cell: int, resample=Image.NEAREST) -> Image.Image:
    return Image.fromarray(rgb).resize((cell, cell), resample)


def _layer_title(field: MotionField, max_magnitude: float) -> str:
    T, H, W = field.grid
    return f"{field.name}\n{H}x{W} tokens, max {max_magnitude:.2f} tok"


def _compose(rows: list[list[Image.Image | None]], titles: list[str], cell: int) -> Image.Image:
    """A grid of cell x cell panels under a row of titles (None leaves a panel blank)."""
    columns = len(titles)
    sheet = Image.new("RGB", (columns * cell, _TITLE_HEIGHT + len(rows) * cell), _BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    font = _font(10)
    for c, title in enumerate(titles):
        draw.multiline_text((c * cell + cell / 2, _TITLE_HEIGHT / 2), title, fill=(0, 0, 0), font=font,
                            anchor="mm", align="center")
    for r, row in enumerate(rows):
        for c, panel in enumerate(row):
            if panel is not None:
                sheet.paste(panel, (c * cell, _TITLE_HEIGHT + r * cell))
    return sheet


def write_pictures(frames: np.ndarray, fields: list[MotionField], out_dir: str, cell: int = 128) -> list[str]:
    """Write flow.png, arrows.png and motion.gif for the first clip of the batch; returns their paths.

    frames: (T, S, S, 3) uint8, the clip the model saw. Each field's head-averaged expected displacement
    is shown; each layer is scaled to its own largest displacement (given in its title, in tokens).
    - flow.png: one row per frame pair t -> t+1: the frame t, then per EMIM layer the colour-coded field
      with its arrows, and the colour-wheel legend;
    - arrows.png: the same rows, the frame with each layer's arrows on it;
    - motion.gif: the rows of both as an animation over time.
    """
    pairs = fields[0].mean_displacement.shape[1]
    frame_panels = [_panel(frames[t], cell, Image.BILINEAR) for t in range(pairs)]
    for t, panel in enumerate(frame_panels):
        ImageDraw.Draw(panel).text((3, 2), f"t={t}", fill=(255, 255, 255), font=_font(10),
                                   stroke_width=1, stroke_fill=(0, 0, 0))

    flow_columns, arrow_columns, titles = [], [], []
    for field in fields:
        flow = field.mean_displacement[0].float().cpu().numpy()              # (P, h, w, 2)
        max_magnitude = max(float(np.hypot(flow[..., 0], flow[..., 1]).max()), 1e-6)
        gain = 0.9 * cell / flow.shape[2] / max_magnitude                     # longest arrow: 0.9 token
        titles.append(_layer_title(field, max_magnitude))
        colour_panels, arrow_panels = [], []
        for t in range(pairs):
            colour_panel = _panel(flow_to_rgb(flow[t], max_magnitude), cell)
            draw_arrows(colour_panel, flow[t], gain, colour=(0, 0, 0))
            colour_panels.append(colour_panel)
            arrow_panel = frame_panels[t].copy()
            draw_arrows(arrow_panel, flow[t], gain, colour=(255, 230, 0), outline=(0, 0, 0))
            arrow_panels.append(arrow_panel)
        flow_columns.append(colour_panels)
        arrow_columns.append(arrow_panels)

    wheel = legend(cell)
    flow_rows = [[frame_panels[t]] + [column[t] for column in flow_columns] + [wheel if t == 0 else None]
                 for t in range(pairs)]
    flow_titles = ["frame t (-> t+1)"] + titles + ["legend: direction,\nlength / max"]
    arrow_rows = [[column[t] for column in arrow_columns] for t in range(pairs)]

    paths = [os.path.join(out_dir, name) for name in PICTURES]
    _compose(flow_rows, flow_titles, cell).save(paths[0], optimize=True)
    _compose(arrow_rows, titles, cell).save(paths[1], optimize=True)
    animation = [_compose([flow_rows[t][:-1] + arrow_rows[t] + [wheel]], flow_titles[:-1] + titles + flow_titles[-1:],
                          cell) for t in range(pairs)]
    # GIF has 256 colours: a palette fitted to each frame, and dithering, keep the colour wheel's gradients.
    animation = [image.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.FLOYDSTEINBERG)
                 for image in animation]
    animation[0].save(paths[2], save_all=True, append_images=animation[1:], duration=400, loop=0, optimize=True)
    return paths
