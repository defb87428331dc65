"""``--plot``: a PNG of lip-sync confidence and identity similarity per second, drawn with PIL."""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from hallo3_cli.fsutil import atomic_path

WIDTH, HEIGHT = 1000, 650
LEFT, RIGHT = 80, 30
BLUE, ORANGE, GREEN, GREY, INK, GRID = (31, 119, 180), (255, 127, 14), (44, 160, 44), (200, 200, 200), (30, 30, 30), (228, 228, 228)
PALE = (214, 230, 244)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType
        return ImageFont.load_default()


def _nice_step(span: float, target: int = 6) -> float:
    raw = max(span, 1e-9) / target
    power = 10 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)


def _ticks(low: float, high: float, target: int = 6) -> list[float]:
    step = _nice_step(high - low, target)
    first = math.ceil(low / step - 1e-9) * step
    count = int(math.floor((high - first) / step + 1e-9)) + 1
    return [round(first + k * step, 10) for k in range(count)]


def _label(value: float) -> str:
    return f"{value:g}" if abs(value) >= 1e-9 else "0"


class _Panel:
    def __init__(self, draw, box, x_range, y_range, title, y_label, fonts):
        self.draw, self.box, self.x_range, self.y_range = draw, box, x_range, y_range
        self.small, self.normal = fonts
        x0, y0, x1, y1 = box
        draw.text((x0, y0 - 24), title, fill=INK, font=self.normal)
        for value in _ticks(*y_range, target=5):
            y = self.y(value)
            draw.line([(x0, y), (x1, y)], fill=GRID)
            draw.text((x0 - 8, y), _label(value), fill=INK, font=self.small, anchor="rm")
        for value in _ticks(*x_range, target=10):
            x = self.x(value)
            draw.line([(x, y0), (x, y1)], fill=GRID)
            draw.text((x, y1 + 6), _label(value), fill=INK, font=self.small, anchor="ma")
        draw.rectangle(box, outline=INK)
        label = Image.new("RGBA", (y1 - y0, 20), (255, 255, 255, 0))
        ImageDraw.Draw(label).text(((y1 - y0) / 2, 10), y_label, fill=INK, font=self.small, anchor="mm")
        draw._image.paste(label.rotate(90, expand=True), (12, y0), label.rotate(90, expand=True))

    def x(self, value: float) -> float:
        x0, _, x1, _ = self.box
        low, high = self.x_range
        return x0 + (value - low) / (high - low) * (x1 - x0)

    def y(self, value: float) -> float:
        _, y0, _, y1 = self.box
        low, high = self.y_range
        return y1 - (min(max(value, low), high) - low) / (high - low) * (y1 - y0)

    def series(self, xs, ys, colour, width=3, dots=True) -> None:
        """A polyline broken where values are missing."""
        run = []
        for x, y in zip(xs, ys):
            if y is None or not math.isfinite(y):
                self._flush(run, colour, width, dots)
                run = []
            else:
                run.append((self.x(x), self.y(y)))
        self._flush(run, colour, width, dots)

    def _flush(self, run, colour, width, dots) -> None:
        if len(run) > 1:
            self.draw.line(run, fill=colour, width=width, joint="curve")
        if dots:
            for x, y in run:
                self.draw.ellipse([x - 3.5, y - 3.5, x + 3.5, y + 3.5], fill=colour)

    def hline(self, value: float, colour, dash: int = 8) -> None:
        x0, _, x1, _ = self.box
        y = self.y(value)
        for start in range(int(x0), int(x1), 2 * dash):
            self.draw.line([(start, y), (min(start + dash, x1), y)], fill=colour, width=2)

    def bars(self, xs, ys, colour) -> None:
        for x, y in zip(xs, ys):
            if y is None or not math.isfinite(y):
                continue
            self.draw.rectangle([self.x(x + 0.1), self.y(y), self.x(x + 0.9), self.y(self.y_range[0])], fill=colour)

    def legend(self, entries) -> None:
        """One row right-aligned above the panel (never over the data)."""
        x1, y0 = self.box[2], self.box[1]
        widths = [self.draw.textlength(text, font=self.small) + 32 for text, _, _ in entries]
        left, y = x1 - sum(widths) - 16 * (len(entries) - 1), y0 - 14
        for (text, colour, kind), width in zip(entries, widths):
            if kind == "bar":
                self.draw.rectangle([left, y - 6, left + 24, y + 6], fill=colour)
            elif kind == "dash":
                self.draw.line([(left, y), (left + 10, y)], fill=colour, width=2)
                self.draw.line([(left + 14, y), (left + 24, y)], fill=colour, width=2)
            else:
                self.draw.line([(left, y), (left + 24, y)], fill=colour, width=3)
                self.draw.ellipse([left + 8.5, y - 3.5, left + 15.5, y + 3.5], fill=colour)
            self.draw.text((left + 30, y), text, fill=INK, font=self.small, anchor="lm")
            left += width + 16


def plot_scores(report, path: str | Path) -> Path:
    """Two panels over time: Sync-C per second (with the whole video's), and ArcFace similarity
    per second (with the share of frames with a face)."""
    seconds = report.seconds
    conf = seconds.get("sync_confidence", [])
    count = max(len(conf), 1)
    xs = [s + 0.5 for s in range(len(conf))]  # each value at the middle of its second
    x_range = (0.0, float(count))
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    fonts = (_font(13), _font(16))
    title = (f"{Path(report.video).name}: Sync-C {report.sync.confidence:.2f}, Sync-D {report.sync.distance:.2f}, "
             f"AV offset {report.sync.offset:+d} frames")
    ident = report.identity
    if ident is not None and ident.similarities:
        title += f", identity {ident.mean:.3f} (p5 {ident.p5:.3f})"
    draw.text((LEFT, 14), title, fill=INK, font=_font(18))

    finite = [v for v in conf if v is not None and math.isfinite(v)] + [report.sync.confidence]
    high = max(max(finite) * 1.15, 1.0)
    top = _Panel(draw, (LEFT, 80, WIDTH - RIGHT, 300), x_range, (0.0, high),
                 "Lip sync: SyncNet confidence per second (Sync-C, higher is better)", "Sync-C", fonts)
    top.hline(report.sync.confidence, ORANGE)
    top.series(xs, conf, BLUE)
    top.legend([("per second", BLUE, "line"), (f"whole video {report.sync.confidence:.2f}", ORANGE, "dash")])

    similar = [v for v in seconds.get("identity_similarity", []) if v is not None and math.isfinite(v)]
    floor = min([0.0] + [math.floor(v * 10) / 10 for v in similar])  # cosines can be negative
    bottom = _Panel(draw, (LEFT, 392, WIDTH - RIGHT, 592), x_range, (floor, 1.0),
                    "Identity: ArcFace cosine similarity per second (higher is closer)", "similarity", fonts)
    if ident is None:
        draw.text(((LEFT + WIDTH - RIGHT) / 2, 492), "identity not measured (no face models in this preset)",
                  fill=INK, font=fonts[1], anchor="mm")
    else:
        bottom.bars(range(count), seconds.get("face_ratio", []), PALE)
        bottom.series(xs, seconds.get("identity_similarity", []), GREEN)
        against = "portrait" if ident.reference == "portrait" else "first face"
        bottom.legend([(f"similarity to the {against}", GREEN, "line"), ("share of frames with a face", PALE, "bar")])
    draw.text(((LEFT + WIDTH - RIGHT) / 2, 630), "time (s)", fill=INK, font=fonts[0], anchor="mm")
    draw.text(((LEFT + WIDTH - RIGHT) / 2, 336), "time (s)", fill=INK, font=fonts[0], anchor="mm")

    path = Path(path)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return path
