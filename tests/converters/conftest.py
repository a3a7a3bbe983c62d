"""Models are built once per session; each is small enough to convert in a second or two."""

from pathlib import Path

import numpy as np
import pytest

from tests import zoo


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def mobilenet(models):
    return zoo.mobilenet_like(models / "mobilenet.onnx")


@pytest.fixture(scope="session")
def recognizer(models):
    return zoo.recognizer(models / "recognizer.onnx")


@pytest.fixture(scope="session")
def detector(models):
    return zoo.mixed_range_detector(models / "detector.onnx")


@pytest.fixture(scope="session")
def digit_lines():
    images, labels = zoo.digit_strings(240, seed=7)
    return images, labels


def random_npz(path: Path, **shapes) -> Path:
    rng = np.random.default_rng(1)
    np.savez(path, **{k: rng.standard_normal(v).astype(np.float32) for k, v in shapes.items()})
    return path
