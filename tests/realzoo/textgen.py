"""Realistic printed text: lines drawn with PIL in real TrueType fonts, with known content and boxes.

Fonts come from Debian's fonts-dejavu-core, which the project's machine image carries (/usr/share/fonts)."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
FONT_FILES = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf",
              "DejaVuSansCondensed.ttf", "DejaVuSerif-Bold.ttf")
WORDS = ["order", "total", "invoice", "date", "amount", "paid", "balance", "customer", "number", "account", "street", "road", "avenue", "city", "station", "platform", "train", "ticket", "price", "sale", "open", "closed", "monday", "friday", "march", "april", "report", "page", "chapter", "section", "table", "figure", "result", "sample", "batch", "serial", "model", "version", "update", "device", "status", "ready", "error", "warning", "power", "battery", "level", "speed", "limit", "exit", "entrance", "parking", "office", "floor", "room", "meeting", "coffee", "water", "bread", "milk", "apple", "green", "blue", "black", "white", "north", "south", "east", "west", "river", "park", "hotel", "museum", "library", "school", "garden", "market"]


@cache
def fonts() -> tuple[Path, ...]:
    found = tuple(FONT_DIR / f for f in FONT_FILES if (FONT_DIR / f).exists())
    if not found:
        raise FileNotFoundError(f"no DejaVu fonts in {FONT_DIR}: apt-get install fonts-dejavu-core")
    return found


def font(rng: np.random.Generator, size: int) -> ImageFont.FreeTypeFont:
    files = fonts()
    return ImageFont.truetype(str(files[rng.integers(len(files))]), size)


def text_line(rng: np.random.Generator, max_chars: int = 24) -> str:
    """Short lines of the kinds found on receipts, signs and labels: words, numbers, dates, codes, prices."""
    kind = rng.integers(6)
    word = lambda: str(rng.choice(WORDS))  # noqa: E731 - tiny local helper
    if kind == 0:
        text = " ".join(word() for _ in range(rng.integers(1, 4)))
        text = text.title() if rng.random() < 0.5 else text
    elif kind == 1:
        text = f"{word().title()} {rng.integers(1, 999)}"
    elif kind == 2:
        text = f"{rng.integers(1, 29):02d}.{rng.integers(1, 13):02d}.{rng.integers(1990, 2030)}"
    elif kind == 3:
        text = f"{word().title()}: ${rng.integers(1, 9999)}.{rng.integers(0, 100):02d}"
    elif kind == 4:
        letters = "".join(rng.choice(list("ABCDEFGHJKLMNPRSTUVWXYZ"), rng.integers(1, 4)))
        text = f"{letters}-{rng.integers(100, 99999)}"
    else:
        text = f"{word().upper()} {rng.integers(10, 99)}:{rng.integers(0, 60):02d}"
    return text[:max_chars]


def paper(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A light background: tinted paper with a gentle gradient and sensor noise."""
    base = rng.uniform(185, 250, 3)
    ramp = np.linspace(-rng.uniform(0, 25), rng.uniform(0, 25), width)[None, :, None]
    noise = rng.normal(0, rng.uniform(1, 6), (height, width, 1))
    pixels = np.clip(base[None, None, :] + ramp + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def ink(rng: np.random.Generator) -> tuple[int, int, int]:
    dark = rng.integers(0, 70)
    tint = rng.integers(0, 60, 3) * (rng.random() < 0.4)
    return tuple(int(min(dark + t, 255)) for t in tint)  # type: ignore[return-value]


def render_line(rng: np.random.Generator, text: str, size: int, *, margin: float = 0.25) -> Image.Image:
    """One text line on paper, cropped around the ink with a random margin, slightly blurred now and then."""
    f = font(rng, size)
    x1, y1, x2, y2 = f.getbbox(text)
    pad_x = int(size * rng.uniform(0.1, margin * 2))
    pad_y = int(size * rng.uniform(0.05, margin))
    width, height = x2 - x1 + 2 * pad_x, y2 - y1 + 2 * pad_y
    image = paper(rng, width, height)
    ImageDraw.Draw(image).text((pad_x - x1, pad_y - y1), text, font=f, fill=ink(rng))
    if rng.random() < 0.3:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.9)))
    return image


def draw_text(image: Image.Image, rng: np.random.Generator, text: str, size: int, xy: tuple[int, int],
              ) -> tuple[int, int, int, int]:
    """Draw ``text`` with its line's top-left at ``xy``; returns the line box as text detectors are labelled:
    the ink's horizontal extent, the font's full line height (ascender top to descender bottom)."""
    f = font(rng, size)
    x1, _, x2, _ = f.getbbox(text)
    ascent, descent = f.getmetrics()
    ImageDraw.Draw(image).text((xy[0] - x1, xy[1]), text, font=f, fill=ink(rng))
    return xy[0], xy[1], xy[0] + x2 - x1, xy[1] + ascent + descent
