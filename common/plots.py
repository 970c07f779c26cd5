"""Small PNG figures: image grids drawn with Pillow (pixels exact), charts drawn with matplotlib.

    image_grid([("0", [img, img]), ("1", [img])], tile=56, columns=2).save("sheet.png")
    bar_chart(["0", "1"], {"labels": [10, 12]}, "classes", "samples").save("hist.png")
    line_panels([Panel("loss", "step", {"train": ([0, 1], [2.0, 1.5])})]).save("curves.png")

The charts are rendered by matplotlib's Agg canvas (no display, no pyplot, the process's matplotlib
backend untouched) into a Pillow image of the size asked for, in pixels. matplotlib is imported when a
chart is drawn, not with this module: `import synth` / `import distill` stay fast.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw, ImageFont

if TYPE_CHECKING:
    from matplotlib.figure import Figure

WHITE, BLACK, LIGHT = (255, 255, 255), (30, 30, 30), (225, 225, 225)
# the series' colours, in order (matplotlib's tab10): bars and lines use them exactly
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]
DPI = 100


def font(size: int = 14) -> ImageFont.ImageFont:
    """Pillow's bundled font at `size` px (older Pillow: its fixed bitmap font)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def text_size(draw: ImageDraw.ImageDraw, text: str, text_font) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=text_font)
    return right - left, bottom - top


# --------------------------------------------------------------------------- image grid
def image_grid(rows: list[tuple[str, list[np.ndarray]]], tile: int, columns: int, title: str = "",
               gap: int = 2) -> Image.Image:
    """One row per (label, images): uint8 (H, W, C) images scaled to `tile` px squares (nearest
    neighbour for small images, so pixels stay visible), the label left of the row."""
    label_font, title_font = font(max(12, tile // 4)), font(16)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_width = max([text_size(probe, label, label_font)[0] for label, _ in rows] + [10]) + 12
    title_height = text_size(probe, title, title_font)[1] + 14 if title else 0
    width = label_width + columns * (tile + gap) + gap
    height = title_height + len(rows) * (tile + gap) + gap
    sheet = Image.new("RGB", (width, height), WHITE)
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((8, 6), title, fill=BLACK, font=title_font)
    for r, (label, images) in enumerate(rows):
        top = title_height + gap + r * (tile + gap)
        _, label_height = text_size(draw, label, label_font)
        draw.text((6, top + (tile - label_height) // 2), label, fill=BLACK, font=label_font)
        for c, image in enumerate(images[:columns]):
            left = label_width + gap + c * (tile + gap)
            sheet.paste(_to_tile(image, tile), (left, top))
        for c in range(len(images), columns):  # fewer images than columns: an empty frame
            left = label_width + gap + c * (tile + gap)
            draw.rectangle((left, top, left + tile - 1, top + tile - 1), outline=LIGHT)
    return sheet


def _to_tile(image: np.ndarray, tile: int) -> Image.Image:
    pil = Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image).convert("RGB")
    resample = Image.NEAREST if max(pil.size) < tile else Image.BILINEAR
    return pil.resize((tile, tile), resample)


# --------------------------------------------------------------------------- charts (matplotlib)
def _colour(index: int) -> tuple[float, float, float]:
    return tuple(c / 255 for c in PALETTE[index % len(PALETTE)])


def _figure(width: int, height: int) -> "Figure":
    """A matplotlib figure of `width` x `height` pixels on an Agg canvas of its own."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # half a pixel more: Agg truncates the figure's size to whole pixels
    figure = Figure(figsize=((width + 0.5) / DPI, (height + 0.5) / DPI), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _image(figure: "Figure") -> Image.Image:
    figure.canvas.draw()
    return Image.fromarray(np.asarray(figure.canvas.buffer_rgba())).convert("RGB")


def bar_chart(categories: list[str], series: dict[str, list[float]], x_label: str, y_label: str,
              title: str = "", width: int = 900, height: int = 420) -> Image.Image:
    """Grouped bars: one group per category, one bar per series (in PALETTE's colours); y from 0; a
    legend when there is more than one series."""
    figure = _figure(width, height)
    axes = figure.add_subplot()
    x = np.arange(len(categories))
    bar = 0.8 / max(len(series), 1)
    for s, (name, values) in enumerate(series.items()):
        axes.bar(x - 0.4 + (s + 0.5) * bar, values, bar, color=_colour(s), label=name, linewidth=0)
    every = max(1, math.ceil(len(categories) / 40))  # at most ~40 category labels
    axes.set_xticks(x[::every], [categories[i] for i in range(0, len(categories), every)], fontsize="small")
    axes.set_xlim(-0.5, max(len(categories), 1) - 0.5)
    axes.set_ylim(bottom=0)
    axes.set_xlabel(x_label)
    axes.set_ylabel(y_label)
    axes.grid(axis="y", color="0.9")
    axes.set_axisbelow(True)
    if title:
        axes.set_title(title, fontsize="medium", loc="left")
    if len(series) > 1:  # in one line above the plot area, right-aligned: never over the bars
        axes.legend(loc="lower right", bbox_to_anchor=(1, 1), ncols=len(series), fontsize="small", frameon=False,
                    borderaxespad=0.2)
    return _image(figure)


@dataclass
class Panel:
    """One line chart: named series of (xs, ys); a y of None is no value (left out)."""

    title: str
    x_label: str
    series: dict[str, tuple[list[float], list[float | None]]] = field(default_factory=dict)
    y_label: str = ""
    markers: bool = False   # also draw a dot at every point (for short series)


def line_panels(panels: list[Panel], panel_width: int = 420, height: int = 340, title: str = "") -> Image.Image:
    """Panels side by side (each `panel_width` px wide), each a line chart with its own axes, lines in
    PALETTE's colours; a panel without data says so. `title` adds 30 px above them."""
    figure = _figure(panel_width * len(panels), height + (30 if title else 0))
    if title:
        figure.suptitle(title, x=0.01, ha="left", fontsize="medium")
    for panel, axes in zip(panels, figure.subplots(1, len(panels), squeeze=False)[0]):
        _draw_panel(axes, panel)
    return _image(figure)


def _draw_panel(axes, panel: Panel) -> None:
    axes.set_title(panel.title, fontsize="small", wrap=True)
    axes.set_xlabel(panel.x_label)
    if panel.y_label:
        axes.set_ylabel(panel.y_label)
    drawn = 0
    for s, (name, (xs, ys)) in enumerate(panel.series.items()):
        points = [(x, y) for x, y in zip(xs, ys) if y is not None and math.isfinite(x) and math.isfinite(y)]
        if not points:
            continue
        px, py = zip(*points)
        marker = "o" if panel.markers or len(points) == 1 else None
        axes.plot(px, py, color=_colour(s), linewidth=2, marker=marker, markersize=4, label=name)
        drawn += 1
    if not drawn:
        axes.text(0.5, 0.5, "no data", transform=axes.transAxes, ha="center", va="center", color="0.5")
        axes.set_xticks([])
        axes.set_yticks([])
        return
    axes.grid(color="0.9")
    if len(panel.series) > 1:
        axes.legend(fontsize="x-small")
