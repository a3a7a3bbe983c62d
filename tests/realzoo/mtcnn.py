"""MTCNN's ONet (facenet-pytorch 2.6.0's weights, data/onet.pt): the last MTCNN stage, a multi-output network
that takes a 48x48 candidate box and returns box offsets [1, 4], five landmarks [1, 10] and face/non-face
probabilities [1, 2]. PyTorch route: the architecture is rebuilt here (facenet-pytorch's ``ONet``, MIT License,
Copyright (c) 2019 Timothy Esler), weights loaded with ``torch.load(weights_only=True)``, saved as a ``.pt2``.

Data: candidate boxes as the second stage would hand them over: jittered squares around the two real faces in
scikit-image's photos (positives, IoU >= 0.65 with the face) and squares from textures and face-free photos
(negatives). Pre-processing as ``detect_face``: RGB crop resized to 48x48 (area interpolation),
(x - 127.5) * 0.0078125, NCHW. ONet's face threshold is 0.7 (MTCNN's default thresholds [0.6, 0.7, 0.7])."""

from __future__ import annotations

import numpy as np

from tests.realzoo import metrics, photos
from tests.realzoo.recipe import BuildContext, Outputs, Recipe, output_of, save_split, write_truth
from tests.realzoo.wheels import FACENET, SKIMAGE

MEMBER = "facenet_pytorch/data/onet.pt"
SIZE = 48
THRESHOLD = 0.7
FACES = (("astronaut.png", (172.5, 82.5, 273.5, 179.5)), ("camera.png", (182.5, 127.5, 265.5, 196.5)))
NEGATIVE_SOURCES = ("brick.png", "grass.png", "gravel.png", "rocket.jpg", "motorcycle_left.png", "chelsea.png",
                    "coffee.png", "page.png")


def onet_module():
    import torch
    from torch import nn

    class ONet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.prelu1 = nn.Conv2d(3, 32, kernel_size=3), nn.PReLU(32)
            self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
            self.conv2, self.prelu2 = nn.Conv2d(32, 64, kernel_size=3), nn.PReLU(64)
            self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
            self.conv3, self.prelu3 = nn.Conv2d(64, 64, kernel_size=3), nn.PReLU(64)
            self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
            self.conv4, self.prelu4 = nn.Conv2d(64, 128, kernel_size=2), nn.PReLU(128)
            self.dense5, self.prelu5 = nn.Linear(1152, 256), nn.PReLU(256)
            self.dense6_1, self.softmax6_1 = nn.Linear(256, 2), nn.Softmax(dim=1)
            self.dense6_2 = nn.Linear(256, 4)
            self.dense6_3 = nn.Linear(256, 10)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            x = self.pool1(self.prelu1(self.conv1(x)))
            x = self.pool2(self.prelu2(self.conv2(x)))
            x = self.pool3(self.prelu3(self.conv3(x)))
            x = self.prelu4(self.conv4(x)).permute(0, 3, 2, 1).contiguous()
            x = self.prelu5(self.dense5(x.view(x.shape[0], -1)))
            return self.dense6_2(x), self.dense6_3(x), self.softmax6_1(self.dense6_1(x))

    return ONet()


def export_pt2(weights_path, out) -> None:
    import torch

    model = onet_module()
    model.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True))
    model.eval()
    torch.export.save(torch.export.export(model, (torch.zeros(1, 3, SIZE, SIZE),)), str(out))


def crop_input(image, box: tuple[float, float, float, float]) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    pixels = np.asarray(image.crop(tuple(round(v) for v in box)), np.float32)  # type: ignore[arg-type]
    tensor = torch.from_numpy(pixels.transpose(2, 0, 1).copy())[None]
    resized = F.interpolate(tensor, size=(SIZE, SIZE), mode="area")  # facenet-pytorch's imresample
    return ((resized - 127.5) * 0.0078125).numpy()


def candidates(ctx: BuildContext, seed: int, count: int) -> tuple[np.ndarray, list[int]]:
    """Alternating positives (1) and negatives (0)."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    while len(labels) < count:
        if len(labels) % 2 == 0:
            name, face = FACES[rng.integers(len(FACES))]
            image = photos.photo(ctx, name)
            w, h = face[2] - face[0], face[3] - face[1]
            side = max(w, h) * rng.uniform(0.85, 1.2)
            cx = (face[0] + face[2]) / 2 + rng.uniform(-0.12, 0.12) * w
            cy = (face[1] + face[3]) / 2 + rng.uniform(-0.12, 0.12) * h
            box = (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
            if metrics.box_iou(np.array(box), np.array(face))[0, 0] < 0.65:
                continue
            labels.append(1)
        else:  # half from face-free pictures, half hard negatives: the face photos away from the face
            hard = rng.random() < 0.5
            name, face = FACES[rng.integers(len(FACES))] if hard else (str(rng.choice(NEGATIVE_SOURCES)), None)
            image = photos.photo(ctx, name)
            side = rng.uniform(40, min(image.size) * 0.5)
            x, y = rng.uniform(0, image.width - side), rng.uniform(0, image.height - side)
            box = (x, y, x + side, y + side)
            if face and metrics.box_iou(np.array(box), np.array(face))[0, 0] >= 0.2:
                continue
            labels.append(0)
        images.append(crop_input(image, box))
    return np.stack(images), labels


def build(ctx: BuildContext) -> None:
    export_pt2(ctx.extract(FACENET, MEMBER), ctx.out / "model.pt2")
    calibration, _ = candidates(ctx, 31, 48)
    evaluation, labels = candidates(ctx, 32, 128)
    save_split(ctx.out, {"x": calibration}, {"x": evaluation})
    write_truth(ctx.out, {
        "output": "softmax", "task": "classification", "face_threshold": THRESHOLD,
        "comment": "outputs of the exported program, in order: box offsets [1, 4] (linear_1), landmarks [1, 10] "
                   "(linear_2), face probabilities [1, 2] (softmax; index 1 = face, kept when > face_threshold 0.7); "
                   "samples: 1 face, 0 not a face. The offsets and landmarks have no ground truth here (MTCNN's "
                   "box convention is its own): compare them with FP32",
        "samples": labels})


def score(truth: dict, outputs: Outputs) -> dict[str, float]:
    """Face/non-face accuracy at ONet's threshold."""
    probs = np.array([output_of(o, truth["output"]).reshape(-1)[1] for o in outputs])
    labels = np.array(truth["samples"])
    return {"accuracy": float(((probs > truth["face_threshold"]) == (labels == 1)).mean()),
            "face_recall": float((probs[labels == 1] > truth["face_threshold"]).mean()),
            "false_face_rate": float((probs[labels == 0] > truth["face_threshold"]).mean())}


RECIPE = Recipe(
    name="mtcnn_onet", wheels=(FACENET, SKIMAGE), members=(MEMBER,), model_file="model.pt2", revision=4,
    build=build, score=score, summary="MTCNN ONet (.pt2 via torch.export), 3 outputs, 48x48 face candidates")
