"""Real photographs and textures from scikit-image's wheel (its sample data), used to compose scenes."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter

from tests.realzoo.recipe import BuildContext
from tests.realzoo.wheels import SKIMAGE

BACKGROUNDS = ("brick.png", "grass.png", "gravel.png", "rocket.jpg", "motorcycle_left.png", "chelsea.png",
               "hubble_deep_field.jpg", "page.png")


def photo(ctx: BuildContext, name: str) -> Image.Image:
    with Image.open(ctx.extract(SKIMAGE, f"skimage/data/{name}")) as image:
        return image.convert("RGB")


def background(ctx: BuildContext, rng: np.random.Generator, size: tuple[int, int],
               names: tuple[str, ...] = BACKGROUNDS) -> Image.Image:
    """A random crop of a random texture or photo, resized to ``size`` (width, height), re-lit a little."""
    source = photo(ctx, str(rng.choice(names)))
    scale = rng.uniform(0.5, 1.0)
    w, h = int(source.width * scale), int(source.height * scale)
    x, y = rng.integers(0, source.width - w + 1), rng.integers(0, source.height - h + 1)
    crop = source.crop((x, y, x + w, y + h)).resize(size, Image.Resampling.BILINEAR)
    if rng.random() < 0.5:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return ImageEnhance.Brightness(crop).enhance(rng.uniform(0.7, 1.2))


def feathered_mask(size: tuple[int, int], feather: int) -> Image.Image:
    """An alpha mask opaque in the middle and fading at the edges, so pasted crops leave no hard seams."""
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).rectangle((feather, feather, size[0] - feather, size[1] - feather), fill=255)
    return mask.filter(ImageFilter.GaussianBlur(feather / 2))
