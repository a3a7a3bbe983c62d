"""NudeNet 3.4's detector: an Ultralytics YOLOv8n (anchor-free, 18 classes) at 320x320.

Scenes: the FP32 model's reliable classes are faces, so real faces (scikit-image's astronaut and cameraman
photographs) are pasted at known places and scales on real textures and photos. Pre-processing as
nudenet.py ``_read_image``: pad right/bottom to a square, resize to 320 (bilinear), RGB, /255, NCHW.
Post-processing as ``_postprocess``: rows of [cx, cy, w, h, 18 class scores], candidates over 0.2, NMS over 0.25
at IoU 0.45 (cv2.dnn.NMSBoxes, class-agnostic)."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageEnhance

from tests.realzoo import metrics, photos
from tests.realzoo.recipe import BuildContext, Outputs, Recipe, output_of, save_split, write_truth
from tests.realzoo.wheels import NUDENET, SKIMAGE

MEMBER = "nudenet/320n.onnx"
INPUT = 320
SCENE = 640  # scenes are composed at 640 and resized to 320, as a larger photo would be
FACE_FEMALE, FACE_MALE = 1, 12
# The task is face detection: the FP32 model calls the cameraman FACE_FEMALE about as often as FACE_MALE, so the
# two face classes count as one (class 1) on both sides; every other class stays itself (a false positive).
CLASS_MAP = {FACE_MALE: FACE_FEMALE}
CANDIDATE_THRESHOLD, SCORE_THRESHOLD, NMS_IOU = 0.2, 0.25, 0.45
# (photo, crop around the head and shoulders, the face box in the photo found by the FP32 model, class)
FACES = (("astronaut.png", (90, 0, 380, 330), (172.5, 82.5, 273.5, 179.5), FACE_FEMALE),
         ("camera.png", (110, 40, 330, 330), (182.5, 127.5, 265.5, 196.5), FACE_FEMALE))


def paste_face(ctx: BuildContext, rng: np.random.Generator, scene: Image.Image, taken: list[tuple],
               ) -> list[float] | None:
    name, crop_box, face_box, cls = FACES[rng.integers(len(FACES))]
    crop = photos.photo(ctx, name).crop(crop_box)
    face_w = rng.uniform(90, 220)  # face width in the 640 scene: 45-110 px at the model's input
    scale = min(face_w / (face_box[2] - face_box[0]), 0.9 * SCENE / max(crop.size))
    crop = crop.resize((int(crop.width * scale), int(crop.height * scale)), Image.Resampling.BILINEAR)
    crop = ImageEnhance.Brightness(crop).enhance(rng.uniform(0.75, 1.2))
    flip = rng.random() < 0.5
    if flip:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    for _ in range(20):  # find a free spot
        x = int(rng.integers(0, SCENE - crop.width + 1))
        y = int(rng.integers(0, SCENE - crop.height + 1))
        if all(x + crop.width <= a or a + w <= x or y + crop.height <= b or b + h <= y for a, b, w, h in taken):
            break
    else:
        return None
    taken.append((x, y, crop.width, crop.height))
    scene.paste(crop, (x, y), photos.feathered_mask(crop.size, max(4, crop.width // 12)))
    fx1, fy1, fx2, fy2 = ((v - o) * scale for v, o in zip(face_box, crop_box[:2] * 2, strict=True))
    if flip:
        fx1, fx2 = crop.width - fx2, crop.width - fx1
    k = INPUT / SCENE
    return [round((x + fx1) * k, 1), round((y + fy1) * k, 1), round((x + fx2) * k, 1), round((y + fy2) * k, 1), cls]


def scenes(ctx: BuildContext, seed: int, count: int) -> tuple[np.ndarray, list[list[list[float]]]]:
    rng = np.random.default_rng(seed)
    images, truth = [], []
    for _ in range(count):
        scene = photos.background(ctx, rng, (SCENE, SCENE))
        taken: list[tuple] = []
        boxes = [b for b in (paste_face(ctx, rng, scene, taken) for _ in range(rng.integers(1, 3))) if b]
        pixels = np.asarray(scene.resize((INPUT, INPUT), Image.Resampling.BILINEAR), np.float32) / 255.0
        images.append(pixels.transpose(2, 0, 1)[None])
        truth.append(boxes)
    return np.stack(images), truth


def build(ctx: BuildContext) -> None:
    (ctx.out / "model.onnx").write_bytes(ctx.extract(NUDENET, MEMBER).read_bytes())
    calibration, _ = scenes(ctx, 11, 48)
    evaluation, truth = scenes(ctx, 22, 128)
    save_split(ctx.out, {"images": calibration}, {"images": evaluation})
    write_truth(ctx.out, {
        "output": "output0", "task": "detection", "score_threshold": SCORE_THRESHOLD, "nms_iou": NMS_IOU,
        "candidate_threshold": CANDIDATE_THRESHOLD,
        "comment": "output0 [1, 22, 2100]: per anchor point cx, cy, w, h (input pixels) then 18 class scores "
                   "(sigmoid, no objectness); boxes below are x1, y1, x2, y2 in input pixels, class index",
        "classes": {str(FACE_FEMALE): "FACE (FACE_FEMALE or FACE_MALE)"},
        "class_map": {str(k): v for k, v in CLASS_MAP.items()},
        "class_map_comment": "map predicted classes through class_map before matching (face = either gender)",
        "samples": truth})


def decode(output: np.ndarray, threshold: float, nms_iou: float, class_map: dict[int, int] | None = None,
           ) -> list[list[float]]:
    """[1, 22, N] → [x1, y1, x2, y2, class, score] after NMS, classes mapped through ``class_map``."""
    class_map = class_map or {}
    rows = output[0].T
    scores = rows[:, 4:].max(1)
    keep = scores >= threshold
    rows, scores = rows[keep], scores[keep]
    classes = rows[:, 4:].argmax(1)
    boxes = np.concatenate([rows[:, :2] - rows[:, 2:4] / 2, rows[:, :2] + rows[:, 2:4] / 2], 1)
    return [[*map(float, boxes[i]), class_map.get(int(classes[i]), int(classes[i])), float(scores[i])]
            for i in metrics.nms(boxes, scores, nms_iou)]


def score(truth: dict, outputs: Outputs) -> dict[str, float]:
    """P/R/F1 at the package's threshold (0.25) and mAP@0.5 over detections down to 0.05."""
    class_map = {int(k): v for k, v in truth.get("class_map", {}).items()}
    loose = [decode(output_of(o, truth["output"]), 0.05, truth["nms_iou"], class_map) for o in outputs]
    operating = [[d for d in dets if d[5] >= truth["score_threshold"]] for dets in loose]
    result = metrics.precision_recall(operating, truth["samples"])
    result["map50"] = metrics.average_precision(loose, truth["samples"])
    return result


RECIPE = Recipe(
    name="yolov8n_nudenet", wheels=(NUDENET, SKIMAGE), members=(MEMBER,), model_file="model.onnx", revision=2,
    build=build, score=score, summary="NudeNet YOLOv8n detector (faces on real textures), 320x320")
