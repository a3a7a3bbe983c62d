"""PP-OCR models from rapidocr-onnxruntime: the PP-OCRv4 recognizer (CTC), the text-direction classifier and
the PP-OCRv4 DBNet text detector. Pre- and post-processing follow rapidocr_onnxruntime 1.4.4 (config.yaml,
ch_ppocr_*/): BGR channel order (cv2 reads BGR), (x/255 - 0.5)/0.5, NCHW."""

from __future__ import annotations

import math

import numpy as np
import onnx
from PIL import Image

from tests.realzoo import metrics, textgen
from tests.realzoo.recipe import BuildContext, Outputs, Recipe, output_of, save_split, write_truth
from tests.realzoo.wheels import RAPIDOCR

REC_MEMBER = "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx"
CLS_MEMBER = "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx"
DET_MEMBER = "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx"
REC_HEIGHT, REC_WIDTH = 48, 320  # rec_img_shape [3, 48, 320]
CLS_HEIGHT, CLS_WIDTH = 48, 192  # cls_image_shape [3, 48, 192]


def normalize_bgr(image: Image.Image) -> np.ndarray:
    """HWC RGB image → CHW float, BGR order, scaled to [-1, 1]."""
    pixels = np.asarray(image.convert("RGB"), np.float32)[:, :, ::-1]
    return ((pixels / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)


def resize_norm_pad(image: Image.Image, height: int, width: int) -> np.ndarray:
    """rapidocr's resize_norm_img: keep the aspect ratio at the fixed height, cap the width, zero-pad the rest."""
    ratio = image.width / image.height
    resized_w = min(width, math.ceil(height * ratio))
    chw = normalize_bgr(image.resize((resized_w, height), Image.Resampling.BILINEAR))
    padded = np.zeros((3, height, width), np.float32)
    padded[:, :, :resized_w] = chw
    return padded


def ctc_dictionary(model_path) -> list[str]:
    """rapidocr's CTCLabelDecode: "blank" first, the dictionary from the model's metadata, then a space."""
    meta = {p.key: p.value for p in onnx.load(str(model_path), load_external_data=False).metadata_props}
    return ["blank", *meta["character"].splitlines(), " "]


# ------------------------------------------------------------------------------------------- recognizer


def rec_lines(seed: int, count: int, charset: dict[str, int]) -> tuple[np.ndarray, list[str]]:
    """Rendered lines that fit 48x320 without squeezing (aspect ≤ 320/48), so the width cap never distorts."""
    rng = np.random.default_rng(seed)
    images, texts = [], []
    while len(texts) < count:
        text = textgen.text_line(rng)
        if any(c not in charset for c in text):
            continue
        line = textgen.render_line(rng, text, int(rng.integers(28, 44)))
        if line.width / line.height > REC_WIDTH / REC_HEIGHT:
            continue
        images.append(resize_norm_pad(line, REC_HEIGHT, REC_WIDTH)[None])
        texts.append(text)
    return np.stack(images), texts


def build_rec(ctx: BuildContext) -> None:
    source = ctx.extract(RAPIDOCR, REC_MEMBER)
    (ctx.out / "model.onnx").write_bytes(source.read_bytes())
    chars = ctc_dictionary(source)
    index = {c: i for i, c in reversed(list(enumerate(chars)))}  # first index wins on duplicates
    calibration, _ = rec_lines(101, 48, index)
    evaluation, texts = rec_lines(202, 160, index)
    save_split(ctx.out, {"x": calibration}, {"x": evaluation})
    write_truth(ctx.out, {
        "output": "softmax_11.tmp_0", "task": "sequence", "blank": 0,
        "comment": "output [batch=1, T=40, 6625] softmax; time_axis=1, batch_axis=0; CTC greedy: argmax, merge "
                   "repeats, drop blank 0; ids index 'characters' (blank first, space last, as rapidocr)",
        "time_axis": 1, "batch_axis": 0, "ignore_ids": [len(chars) - 1],
        "ignore_comment": "spaces are ignored when comparing, as PaddleOCR's RecMetric does (ignore_space=True)",
        "samples": [[index[c] for c in t] for t in texts], "texts": texts, "characters": chars})


def score_sequence(truth: dict, outputs: Outputs) -> dict[str, float]:
    """Greedy CTC decode along the truth's time axis (batch 1) → exact-line accuracy and CER."""
    decoded = []
    for sample in outputs:
        scores = np.moveaxis(output_of(sample, truth["output"]), truth["time_axis"], 0)
        scores = scores.reshape(scores.shape[0], -1)
        decoded.append(metrics.ctc_greedy(scores, truth["blank"]))
    ignored = set(truth.get("ignore_ids", []))
    same = {int(i): int(group[0]) for group in truth.get("equivalent_ids", []) for i in group[1:]}
    canonical = lambda ids: [same.get(i, i) for i in ids if i not in ignored]  # noqa: E731 - tiny local helper
    return metrics.sequence_scores([canonical(d) for d in decoded], [canonical(s) for s in truth["samples"]])


REC = Recipe(
    name="ppocr_rec", wheels=(RAPIDOCR,), members=(REC_MEMBER,), model_file="model.onnx", revision=2,
    build=build_rec, score=score_sequence,
    summary="PP-OCRv4 text recognizer (SVTR-LCNet, CTC, attention neck), rendered text lines 48x320")


# ------------------------------------------------------------------------------------------- direction classifier


def cls_lines(seed: int, count: int) -> tuple[np.ndarray, list[int]]:
    """Rendered lines, every other one turned upside down (label 1 = "180", rapidocr's label_list)."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for i in range(count):
        line = textgen.render_line(rng, textgen.text_line(rng), int(rng.integers(24, 44)))
        label = i % 2
        if label:
            line = line.rotate(180)
        images.append(resize_norm_pad(line, CLS_HEIGHT, CLS_WIDTH)[None])
        labels.append(label)
    return np.stack(images), labels


def build_cls(ctx: BuildContext) -> None:
    (ctx.out / "model.onnx").write_bytes(ctx.extract(RAPIDOCR, CLS_MEMBER).read_bytes())
    calibration, _ = cls_lines(303, 48)
    evaluation, labels = cls_lines(404, 160)
    save_split(ctx.out, {"x": calibration}, {"x": evaluation})
    write_truth(ctx.out, {
        "output": "save_infer_model/scale_0.tmp_1", "task": "classification", "labels": ["0", "180"],
        "comment": "output [1, 2] softmax over text orientation (0°, 180°); rapidocr flips a line when 180 "
                   "scores over cls_thresh 0.9", "samples": labels})


def score_classification(truth: dict, outputs: Outputs) -> dict[str, float]:
    predicted = [int(output_of(o, truth["output"]).reshape(-1).argmax()) for o in outputs]
    return {"top1": float(np.mean([p == t for p, t in zip(predicted, truth["samples"], strict=True)]))}


CLS = Recipe(
    name="ppocr_cls", wheels=(RAPIDOCR,), members=(CLS_MEMBER,), model_file="model.onnx", revision=1,
    build=build_cls, score=score_classification,
    summary="PP-OCR mobile v2 text-direction classifier (0/180°), rendered lines 48x192")


# ------------------------------------------------------------------------------------------- DBNet text detector

# Pages are made at 512x512, a multiple of 32, which PaddleOCR's own default resize (limit_type max, 960) passes
# unchanged; rapidocr's (limit_type min, 736) would upscale them to 736, at twice the pixels per sample (the
# evaluation set would pass 300 MB).
DET_SIZE = 512
DB_THRESH, DB_BOX_THRESH, DB_UNCLIP, DB_MIN_SIZE = 0.3, 0.5, 1.6, 3  # config.yaml Det, DBPostProcess


def det_scenes(seed: int, count: int) -> tuple[np.ndarray, list[list[list[int]]]]:
    """Pages of 3-8 text lines at known places; boxes are the lines' ink (x1, y1, x2, y2)."""
    rng = np.random.default_rng(seed)
    images, truth = [], []
    for _ in range(count):
        page = textgen.paper(rng, DET_SIZE, DET_SIZE)
        boxes: list[list[int]] = []
        for _ in range(int(rng.integers(3, 9)) * 4):  # tries
            if len(boxes) >= 8:
                break
            text, size = textgen.text_line(rng), int(rng.integers(14, 44))
            width, height = textgen.font(rng, size).getbbox(text)[2], int(size * 1.25)
            if width >= DET_SIZE - 20:
                continue
            x, y = int(rng.integers(10, DET_SIZE - width - 10)), int(rng.integers(10, DET_SIZE - height - 10))
            spaced = [x - size // 2, y - size // 2, x + width + size // 2, y + height + size // 2]
            if any(metrics.box_iou(np.array(spaced), np.array(b))[0, 0] > 0 for b in boxes):
                continue
            boxes.append(list(textgen.draw_text(page, rng, text, size, (x, y))))
        images.append(normalize_bgr(page)[None])
        truth.append(boxes)
    return np.stack(images), truth


def build_det(ctx: BuildContext) -> None:
    (ctx.out / "model.onnx").write_bytes(ctx.extract(RAPIDOCR, DET_MEMBER).read_bytes())
    calibration, _ = det_scenes(505, 24)
    evaluation, truth = det_scenes(606, 40)
    save_split(ctx.out, {"x": calibration}, {"x": evaluation})
    write_truth(ctx.out, {
        "output": "sigmoid_0.tmp_0", "task": "segmentation", "threshold": DB_THRESH, "box_threshold": DB_BOX_THRESH,
        "unclip_ratio": DB_UNCLIP,
        "comment": "output [1, 1, 512, 512] text probability map (same pixels as the input); boxes are text "
                   "lines (ink width, font line height) x1, y1, x2, y2 in map pixels; DB post-processing: map > threshold, 2x2 "
                   "dilation, regions scored by mean probability (>= box_threshold), unclipped by "
                   "area*unclip_ratio/perimeter", "samples": truth})


def db_boxes(probability: np.ndarray, thresh: float, box_thresh: float, unclip_ratio: float) -> list[list[float]]:
    """rapidocr's DBPostProcess with axis-aligned boxes (the text here is horizontal)."""
    from scipy import ndimage

    prob = probability.reshape(probability.shape[-2:])
    bitmap = ndimage.binary_dilation(prob > thresh, structure=np.ones((2, 2), bool))
    labels, _ = ndimage.label(bitmap, structure=np.ones((3, 3), bool))
    boxes = []
    for region in ndimage.find_objects(labels):
        ys, xs = region
        w, h = xs.stop - xs.start, ys.stop - ys.start
        if min(w, h) < DB_MIN_SIZE or prob[region].mean() < box_thresh:
            continue
        grow = w * h * unclip_ratio / (2 * (w + h))
        if min(w, h) + 2 * grow < DB_MIN_SIZE + 2:
            continue
        boxes.append([xs.start - grow, ys.start - grow, xs.stop + grow, ys.stop + grow, 0, float(prob[region].mean())])
    return boxes


def score_segmentation(truth: dict, outputs: Outputs) -> dict[str, float]:
    found = [db_boxes(output_of(o, truth["output"]), truth["threshold"], truth["box_threshold"],
                      truth["unclip_ratio"]) for o in outputs]
    return metrics.precision_recall(found, [[[*b, 0] for b in boxes] for boxes in truth["samples"]])


DET = Recipe(
    name="ppocr_det", wheels=(RAPIDOCR,), members=(DET_MEMBER,), model_file="model.onnx", revision=3,
    build=build_det, score=score_segmentation,
    summary="PP-OCRv4 DBNet text detector, rendered pages 512x512, probability map output")
