"""Ground truth for the evaluation samples (``fleet-convert convert --truth truth.json``).

One JSON document names the output it describes, the task, and one entry per evaluation sample, in order::

    {"output": "output0", "task": "detection", "score_threshold": 0.25,
     "samples": [[[x1, y1, x2, y2, class], ...], ...]}

- ``classification``: the true class index (``tolerance_bins``: near misses that count as right, e.g. pitch bins);
- ``sequence``: the true token ids, blank excluded (``blank``: the CTC blank index);
- ``detection``: boxes ``[x1, y1, x2, y2, class]`` in the frame of the model's box rows (``score_threshold``);
- ``segmentation``: region boxes ``[x1, y1, x2, y2]`` in map pixels (``threshold``: the binarisation threshold);
- ``regression``: the true values.

Numeric keys among ``score_threshold``, ``nms_iou``, ``match_iou``, ``threshold``, ``box_threshold``,
``unclip_ratio``, ``blank`` and ``tolerance_bins`` are the task's parameters, applied to the output's decoder.
Three keys say which answers count as the same: ``class_map`` (``{"12": 1}``: a predicted class counted as another),
``equivalent_ids`` (``[[a, b], ...]``: token ids read as the first of their group, e.g. letter case) and
``ignore_ids`` (tokens dropped before comparing, e.g. spaces). Any other key describes the data and is ignored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from converters.errors import CalibrationError
from converters.tasks import OutputKind

MAX_TRUTH_BYTES = 64 << 20
# Parameters a truth file may set on its output's decoder, by the name used in the file.
PARAMS = {"score_threshold": "score_threshold", "nms_iou": "nms_iou", "match_iou": "match_iou",
          "threshold": "map_threshold", "box_threshold": "box_threshold", "unclip_ratio": "unclip_ratio",
          "blank": "blank"}
SCORING = {"tolerance_bins"}


@dataclass(frozen=True)
class Truth:
    output: str
    kind: OutputKind
    samples: list
    params: dict[str, float] = field(default_factory=dict)
    class_map: dict[int, int] = field(default_factory=dict)
    token_map: dict[int, int | None] = field(default_factory=dict)  # equivalent ids → the first; ignored → None
    ignored_keys: list[str] = field(default_factory=list)

    def decoder_params(self) -> dict[str, float]:
        return {PARAMS[k]: v for k, v in self.params.items() if k in PARAMS}

    def classes(self, predicted):
        """Predicted classes as the truth counts them."""
        return [self.class_map.get(int(c), int(c)) for c in predicted]

    def tokens(self, text) -> tuple[int, ...]:
        """A token sequence as the truth compares it."""
        mapped = (self.token_map.get(int(c), int(c)) for c in text)
        return tuple(c for c in mapped if c is not None)


def load_truth(path: Path) -> Truth:
    """Read and validate a truth file; errors name the file and what is wrong."""
    try:
        if path.stat().st_size > MAX_TRUTH_BYTES:
            raise CalibrationError(f"{path}: larger than {MAX_TRUTH_BYTES >> 20} MiB")
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CalibrationError(f"{path}: not a readable JSON truth file ({e})") from e
    if not isinstance(doc, dict):
        raise CalibrationError(f"{path}: expected a JSON object with 'output', 'task' and 'samples'")
    missing = [k for k in ("output", "task", "samples") if k not in doc]
    if missing:
        raise CalibrationError(f"{path}: missing {', '.join(missing)}")
    try:
        kind = OutputKind(doc["task"])
    except ValueError as e:
        known = ", ".join(k.value for k in OutputKind)
        raise CalibrationError(f"{path}: unknown task {doc['task']!r} (known: {known})") from e
    if not isinstance(doc["output"], str) or not isinstance(doc["samples"], list) or not doc["samples"]:
        raise CalibrationError(f"{path}: 'output' must be a name and 'samples' a non-empty list")
    params: dict[str, float] = {}
    for key in (PARAMS.keys() | SCORING) & doc.keys():
        value = doc[key]
        if not isinstance(value, int | float) or isinstance(value, bool) or not 0 <= value < 1e6:
            raise CalibrationError(f"{path}: {key} must be a non-negative number")
        params[key] = float(value)
    _check_samples(path, kind, doc["samples"])
    class_map, token_map = _maps(path, doc)
    known = {"output", "task", "samples", "class_map", "equivalent_ids", "ignore_ids"} | PARAMS.keys() | SCORING
    return Truth(doc["output"], kind, doc["samples"], params, class_map, token_map,
                 sorted(k for k in doc if k not in known))


def _maps(path: Path, doc: dict) -> tuple[dict[int, int], dict[int, int | None]]:
    try:
        class_map = {int(k): int(v) for k, v in (doc.get("class_map") or {}).items()}
        token_map: dict[int, int | None] = {}
        for group in doc.get("equivalent_ids") or []:
            ids = [int(i) for i in group]
            token_map.update({i: ids[0] for i in ids[1:]})
        token_map.update({int(i): None for i in doc.get("ignore_ids") or []})
    except (TypeError, ValueError, AttributeError, IndexError) as e:
        raise CalibrationError(f"{path}: class_map must map class ids to class ids, equivalent_ids be lists of "
                               f"token ids and ignore_ids a list of token ids ({e})") from e
    return class_map, token_map


def _check_samples(path: Path, kind: OutputKind, samples: list) -> None:
    width = {OutputKind.DETECTION: 5, OutputKind.SEGMENTATION: 4}.get(kind)
    for i, s in enumerate(samples):
        ok = True
        if kind is OutputKind.CLASSIFICATION:
            ok = isinstance(s, int) and not isinstance(s, bool)
        elif kind is OutputKind.SEQUENCE:
            ok = isinstance(s, list) and all(isinstance(c, int) and not isinstance(c, bool) for c in s)
        elif width is not None:
            ok = isinstance(s, list) and all(
                isinstance(b, list) and len(b) == width and all(isinstance(v, int | float) for v in b) for b in s)
        elif kind is OutputKind.REGRESSION:
            ok = isinstance(s, list | int | float)
        if not ok:
            raise CalibrationError(f"{path}: samples[{i}] is not a valid {kind.value} label")


def check_against(truth: Truth, outputs: list[str], samples: int) -> None:
    if truth.output not in outputs:
        raise CalibrationError(f"truth names output {truth.output!r}; the model's outputs are {', '.join(outputs)}")
    if len(truth.samples) != samples:
        raise CalibrationError(f"truth has {len(truth.samples)} labels for {samples} evaluation samples (one label "
                               "per evaluation sample, in order)")
