"""Small PNG charts drawn with Pillow (no plotting library): an image grid, grouped bars, line panels.

    image_grid([("0", [img, img]), ("1", [img])], tile=56).save("sheet.png")
    bar_chart(["0", "1"], {"labels": [10, 12]}, "classes", "samples").save("hist.png")
    line_panels([Panel("loss", "step", {"train": ([0, 1], [2.0, 1.5])})]).save("curves.png")
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFont

WHITE, BLACK, GREY, LIGHT = (255, 255, 255), (30, 30, 30), (120, 120, 120), (225, 225, 225)
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def font(size: int = 14) -> ImageFont.ImageFont:
    """Pillow's bundled font at `size` px (older Pillow: its fixed bitmap font)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def text_size(draw: ImageDraw.ImageDraw, text: str, text_font) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=text_font)
    return right - left, bottom - top


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About `count` round tick values covering [low, high]."""
    if not math.isfinite(low) or not math.isfinite(high):
        return [0.0]
    if high <= low:
        high = low + (abs(low) or 1.0)
    raw = (high - low) / max(count, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.floor(low / step) * step
    ticks, value = [], first
    while value <= high + step * 1e-9:
        ticks.append(round(value, 12))
        value += step
    if ticks[-1] < high:
        ticks.append(round(value, 12))
    return ticks


def format_tick(value: float) -> str:
    if value == 0:
        return "0"
    if float(value).is_integer() and abs(value) < 1e12:
        return f"{int(value):,}"
    if abs(value) < 1e-3:
        return f"{value:.0e}"
    return f"{value:.4g}"


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


# --------------------------------------------------------------------------- axes
@dataclass
class _Axes:
    """A plot area inside an image, mapping data coordinates to pixels."""

    left: int
    top: int
    width: int
    height: int
    x_range: tuple[float, float]
    y_range: tuple[float, float]

    def x(self, value: float) -> float:
        low, high = self.x_range
        return self.left + (value - low) / ((high - low) or 1) * self.width

    def y(self, value: float) -> float:
        low, high = self.y_range
        return self.top + self.height - (value - low) / ((high - low) or 1) * self.height


def _draw_axes(draw: ImageDraw.ImageDraw, axes: _Axes, y_ticks: list[float], title: str, x_label: str,
               y_label: str = "") -> None:
    small, big = font(12), font(15)
    for tick in y_ticks:
        y = axes.y(tick)
        draw.line((axes.left, y, axes.left + axes.width, y), fill=LIGHT)
        label = format_tick(tick)
        w, h = text_size(draw, label, small)
        draw.text((axes.left - w - 6, y - h / 2 - 2), label, fill=GREY, font=small)
    draw.rectangle((axes.left, axes.top, axes.left + axes.width, axes.top + axes.height), outline=GREY)
    w, _ = text_size(draw, title, big)
    draw.text((axes.left + (axes.width - w) / 2, axes.top - 44), title, fill=BLACK, font=big)
    w, _ = text_size(draw, x_label, small)
    draw.text((axes.left + (axes.width - w) / 2, axes.top + axes.height + 24), x_label, fill=GREY, font=small)
    if y_label:
        draw.text((axes.left - 54, axes.top - 22), y_label, fill=GREY, font=small)


def _legend(draw: ImageDraw.ImageDraw, names: list[str], right: int, bottom: int) -> None:
    """Coloured keys in one line, right-aligned, just above the plot area (never over the data)."""
    small = font(12)
    x = right
    for i in reversed(range(len(names))):
        w, h = text_size(draw, names[i], small)
        draw.text((x - w, bottom - h - 6), names[i], fill=BLACK, font=small)
        draw.rectangle((x - w - 16, bottom - h - 3, x - w - 5, bottom - 5), fill=PALETTE[i % len(PALETTE)])
        x -= w + 30


# --------------------------------------------------------------------------- bars
def bar_chart(categories: list[str], series: dict[str, list[float]], x_label: str, y_label: str,
              title: str = "", width: int = 900, height: int = 420) -> Image.Image:
    """Grouped bars: one group per category, one bar per series; y from 0."""
    image = Image.new("RGB", (width, height), WHITE)
    draw = ImageDraw.Draw(image)
    top_value = max([max(values) for values in series.values() if values] + [1])
    ticks = nice_ticks(0, top_value)
    axes = _Axes(70, 50, width - 90, height - 110, (0, max(len(categories), 1)), (0, ticks[-1]))
    _draw_axes(draw, axes, ticks, title, x_label, y_label)
    group = axes.width / max(len(categories), 1)
    bar = max(1.0, group * 0.8 / max(len(series), 1))
    every = max(1, math.ceil(len(categories) / 40))  # at most ~40 category labels
    small = font(11)
    for c, category in enumerate(categories):
        for s, values in enumerate(series.values()):
            x0 = axes.left + c * group + group * 0.1 + s * bar
            draw.rectangle((x0, axes.y(values[c]), x0 + bar - (1 if bar > 3 else 0), axes.y(0)),
                           fill=PALETTE[s % len(PALETTE)])
        if c % every == 0:
            w, _ = text_size(draw, category, small)
            draw.text((axes.left + (c + 0.5) * group - w / 2, axes.top + axes.height + 4), category, fill=GREY,
                      font=small)
    if len(series) > 1:
        _legend(draw, list(series), axes.left + axes.width, axes.top)
    return image


# --------------------------------------------------------------------------- lines
@dataclass
class Panel:
    """One line chart: named series of (xs, ys)."""

    title: str
    x_label: str
    series: dict[str, tuple[list[float], list[float]]] = field(default_factory=dict)
    y_label: str = ""
    markers: bool = False   # also draw a dot at every point (for short series)


def line_panels(panels: list[Panel], panel_width: int = 420, height: int = 340, title: str = "") -> Image.Image:
    """Panels side by side, each a line chart with its own axes; a panel without data says so."""
    title_height = 30 if title else 0
    image = Image.new("RGB", (panel_width * len(panels), height + title_height), WHITE)
    draw = ImageDraw.Draw(image)
    if title:
        draw.text((10, 8), title, fill=BLACK, font=font(16))
    for i, panel in enumerate(panels):
        _draw_panel(draw, panel, i * panel_width, title_height, panel_width, height)
    return image


def _draw_panel(draw: ImageDraw.ImageDraw, panel: Panel, left: int, top: int, width: int, height: int) -> None:
    points = [(x, y) for xs, ys in panel.series.values() for x, y in zip(xs, ys)
              if y is not None and math.isfinite(x) and math.isfinite(y)]
    if not points:
        axes = _Axes(left + 70, top + 50, width - 95, height - 110, (0, 1), (0, 1))
        _draw_axes(draw, axes, [], panel.title, panel.x_label, panel.y_label)
        message = "no data"
        w, h = text_size(draw, message, font(14))
        draw.text((axes.left + (axes.width - w) / 2, axes.top + (axes.height - h) / 2), message, fill=GREY,
                  font=font(14))
        return
    xs, ys = zip(*points)
    y_ticks = nice_ticks(min(ys), max(ys))
    x_low, x_high = min(xs), max(xs)
    axes = _Axes(left + 70, top + 50, width - 95, height - 110, (x_low, x_high if x_high > x_low else x_low + 1),
                 (y_ticks[0], y_ticks[-1]))
    _draw_axes(draw, axes, y_ticks, panel.title, panel.x_label, panel.y_label)
    small = font(12)
    for tick in nice_ticks(x_low, x_high, 5):
        if x_low <= tick <= x_high:
            label = format_tick(tick)
            w, _ = text_size(draw, label, small)
            draw.text((axes.x(tick) - w / 2, axes.top + axes.height + 4), label, fill=GREY, font=small)
    for s, (xs_s, ys_s) in enumerate(panel.series.values()):
        colour = PALETTE[s % len(PALETTE)]
        line = [(axes.x(x), axes.y(y)) for x, y in zip(xs_s, ys_s) if y is not None and math.isfinite(y)]
        if len(line) > 1:
            draw.line(line, fill=colour, width=2)
        if panel.markers or len(line) == 1:
            for x, y in line:
                draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=colour)
    if len(panel.series) > 1:
        _legend(draw, list(panel.series), axes.left + axes.width, axes.top)
