"""ddddocr 1.6's "beta" recognizer (common.onnx): a CNN + LSTM captcha/text reader with a CTC head whose output
is [T = width/8, batch 1, 8210] logits (time first), charset ``_get_beta_charset`` (index 0 = blank "").

Data: captcha-like images (4-6 letters and digits, per-character jitter and tilt, interference lines and dots)
rendered at 150x50 and pre-processed as ``ocr_engine._preprocess_image``: resize to height 64 keeping the ratio
(LANCZOS), grayscale, /255, [1, 1, 64, 192]. The charset is read from the wheel's source with ``ast`` (never
imported)."""

from __future__ import annotations

import ast

import numpy as np
from PIL import Image, ImageDraw

from tests.realzoo import textgen
from tests.realzoo.ppocr import score_sequence
from tests.realzoo.recipe import BuildContext, Recipe, save_split, write_truth
from tests.realzoo.wheels import DDDDOCR

MEMBER = "ddddocr/common.onnx"
CHARSET_MEMBER = "ddddocr/models/charset_manager.py"
HEIGHT, WIDTH = 64, 192
CAPTCHA_SIZE = (150, 50)
ALPHABET = "ABCDEFGHJKMNPQRSTUVWXYZabdefghjmnqrty23456789"  # captchas leave out look-alikes (0/O, 1/l/I...)


def beta_charset(source: str) -> list[str]:
    tree = ast.parse(source)
    function = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "_get_beta_charset")
    returned = next(n for n in ast.walk(function) if isinstance(n, ast.Return))
    return list(ast.literal_eval(returned.value))


def captcha(rng: np.random.Generator, text: str) -> Image.Image:
    image = textgen.paper(rng, *CAPTCHA_SIZE)
    draw = ImageDraw.Draw(image)
    size = int(rng.integers(26, 34))
    x = int(rng.integers(4, 14))
    step = (CAPTCHA_SIZE[0] - x - 8) / len(text)
    for ch in text:
        f = textgen.font(rng, size)
        glyph = Image.new("L", (size * 2, size * 2), 0)
        ImageDraw.Draw(glyph).text((size // 2, size // 3), ch, font=f, fill=255)
        glyph = glyph.rotate(float(rng.uniform(-20, 20)), resample=Image.Resampling.BILINEAR)
        color = Image.new("RGB", glyph.size, textgen.ink(rng))
        y = int(rng.integers(-size // 3, max(1, CAPTCHA_SIZE[1] - int(size * 1.6))))
        image.paste(color, (int(x - size // 2), y), glyph)
        x += step * rng.uniform(0.9, 1.05)
    for _ in range(int(rng.integers(1, 4))):  # interference lines
        points = [(int(rng.integers(0, CAPTCHA_SIZE[0])), int(rng.integers(0, CAPTCHA_SIZE[1]))) for _ in range(2)]
        draw.line(points, fill=textgen.ink(rng), width=1)
    for _ in range(int(rng.integers(20, 80))):  # dots
        p = (int(rng.integers(0, CAPTCHA_SIZE[0])), int(rng.integers(0, CAPTCHA_SIZE[1])))
        draw.point(p, fill=textgen.ink(rng))
    return image


def captchas(seed: int, count: int) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    images, texts = [], []
    for _ in range(count):
        text = "".join(rng.choice(list(ALPHABET), int(rng.integers(4, 7))))
        image = captcha(rng, text).resize((WIDTH, HEIGHT), Image.Resampling.LANCZOS).convert("L")
        images.append((np.asarray(image, np.float32) / 255.0)[None, None])
        texts.append(text)
    return np.stack(images), texts


def build(ctx: BuildContext) -> None:
    (ctx.out / "model.onnx").write_bytes(ctx.extract(DDDDOCR, MEMBER).read_bytes())
    chars = beta_charset(ctx.extract(DDDDOCR, CHARSET_MEMBER).read_text(encoding="utf-8"))
    index = {c: i for i, c in reversed(list(enumerate(chars)))}
    calibration, _ = captchas(707, 48)
    evaluation, texts = captchas(808, 128)
    save_split(ctx.out, {"input1": calibration}, {"input1": evaluation})
    write_truth(ctx.out, {
        "output": "387", "task": "sequence", "blank": 0, "time_axis": 0, "batch_axis": 1,
        "comment": "output [T=24, batch=1, 8210] logits, time first; CTC greedy: argmax, merge repeats, drop "
                   "blank 0; ids index 'characters' (ddddocr's beta charset)",
        "samples": [[index[c] for c in t] for t in texts], "texts": texts, "characters": chars,
        "equivalent_ids": [[index[c.lower()], index[c]] for c in ALPHABET if c.isupper() and c.lower() in index],
        "equivalent_comment": "captchas are read case-insensitively: each group's ids count as its first "
                              "(lower case), on both sides, before comparing"})


RECIPE = Recipe(
    name="ddddocr_ocr", wheels=(DDDDOCR,), members=(MEMBER,), model_file="model.onnx", revision=3,
    build=build, score=score_sequence, size_class="large",
    summary="ddddocr beta CNN+LSTM captcha recognizer (54 MB), captchas 64x192 grayscale")
