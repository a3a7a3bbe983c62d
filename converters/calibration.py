"""Calibration and evaluation data: readers, validation against the model's inputs, splitting, hashing.

A sample is one model call: ``{input name: array}`` with every array already shaped like the model input (batch
dimension included). Readers accept:

- ``.npz``: one array per model input, named by the input; a lone array also fits a single-input model.
- a folder of ``.npy``: for a single-input model each file holds one sample or a stack of samples; for a model
  with several inputs, one sub-folder per input with the same file names in each.
- a folder of images, with a declared :class:`ImagePrep` (size, layout, mean/std, channel order).

An array whose rank is the input's rank + 1 is a stack of samples; one whose rank equals the input's rank is
split along its first axis into batch-1 samples.
"""

from __future__ import annotations

import hashlib
import math
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from converters.errors import CalibrationError, DataTooLargeError
from converters.source import TensorSpec

Sample = dict[str, np.ndarray]
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
MAX_SAMPLES = 100_000
# What the arrays of one data set may take once decompressed. Checked against the .npz directory's declared sizes
# and each .npy header before anything is read: a 1 MB .npz can declare a GiB of zeros.
MAX_DATA_BYTES = 1 << 30
MAX_ARRAYS = 10_000  # members of one .npz


@dataclass(frozen=True)
class ImagePrep:
    """How to turn an image file into a model input."""

    height: int
    width: int
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)
    channel_order: Literal["RGB", "BGR"] = "RGB"
    scale: float = 1.0 / 255.0  # applied before mean/std


@dataclass
class DataSet:
    samples: list[Sample]
    origin: str
    synthetic: bool = False
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.samples)

    def sha256(self) -> str:
        return samples_sha256(self.samples)


def samples_sha256(samples: list[Sample]) -> str:
    digest = hashlib.sha256()
    for sample in samples:
        for name in sorted(sample):
            a = np.ascontiguousarray(sample[name])
            digest.update(f"{name}|{a.dtype.str}|{a.shape}".encode())
            digest.update(a.tobytes())
    return digest.hexdigest()


@dataclass
class ByteBudget:
    """How many decompressed bytes a data set may still take; spent before each array is read."""

    limit: int
    used: int = 0

    def check(self, nbytes: int, where: str) -> None:
        if self.used + nbytes > self.limit:
            raise DataTooLargeError(f"{where}: the data would take more than {self.limit / 2**20:.0f} MiB once "
                                    "decompressed; use fewer or smaller samples")

    def spend(self, nbytes: int, where: str) -> None:
        self.check(nbytes, where)
        self.used += nbytes


def load_dataset(path: Path, inputs: list[TensorSpec], *, image_prep: ImagePrep | None = None,
                 limit: int = MAX_SAMPLES, max_bytes: int = MAX_DATA_BYTES) -> DataSet:
    path = Path(path)
    if not path.exists():
        raise CalibrationError(f"{path}: no such calibration file or folder")
    budget = ByteBudget(max_bytes)
    if path.is_file() and path.suffix == ".npz":
        samples = _from_arrays(_read_npz(path, budget), inputs, str(path))
    elif path.is_file() and path.suffix == ".npy":
        if len(inputs) != 1:
            raise CalibrationError(f"{path}: a single .npy fits only a single-input model; use .npz for "
                                   f"{len(inputs)} inputs")
        samples = _from_arrays({inputs[0].name: _read_npy(path, budget)}, inputs, str(path))
    elif path.is_dir():
        images = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if images:
            if image_prep is None:
                raise CalibrationError(f"{path}: a folder of images needs its preprocessing declared "
                                       "(--image-size, --layout, --mean, --std, --channel-order)")
            samples = _from_images(images, inputs, image_prep, limit)
        else:
            samples = _from_npy_folder(path, inputs, budget)
    else:
        raise CalibrationError(f"{path}: calibration data must be a .npz, a .npy, or a folder of .npy or images")
    if not samples:
        raise CalibrationError(f"{path}: holds no samples")
    for i, sample in enumerate(samples[:limit]):
        check_sample(sample, inputs, f"{path} sample {i}")
    return DataSet(samples[:limit], origin=str(path))


def synthetic_dataset(inputs: list[TensorSpec], count: int, *, seed: int = 0) -> DataSet:
    """Random inputs, for when no real data exists. Marked synthetic in every report that uses it."""
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(count):
        sample: Sample = {}
        for spec in inputs:
            dims = [d if isinstance(d, int) else (1 if i == 0 else None) for i, d in enumerate(spec.shape)]
            if any(d is None for d in dims):
                raise CalibrationError(f"input {spec.describe()} has dynamic dims besides the batch; pin them with "
                                       "--input-shape to use synthetic calibration")
            if np.issubdtype(spec.dtype, np.floating):
                sample[spec.name] = rng.standard_normal(dims).astype(spec.dtype)
            elif spec.dtype == np.bool_:
                sample[spec.name] = rng.integers(0, 2, dims).astype(np.bool_)
            else:
                sample[spec.name] = rng.integers(0, 100, dims).astype(spec.dtype)
        samples.append(sample)
    return DataSet(samples, origin=f"synthetic:{count}", synthetic=True,
                   notes=[f"SYNTHETIC random calibration ({count} samples): fidelity figures do not reflect real data"])


def split(data: DataSet, eval_fraction: float, *, seed: int = 0) -> tuple[DataSet, DataSet]:
    """A seeded shuffle split, so that sorted data (all class 0, then all class 1...) still splits fairly."""
    if len(data) < 2:
        raise CalibrationError(f"{data.origin}: {len(data)} sample(s); need at least 2 to split into calibration "
                               "and evaluation parts (or pass --eval)")
    order = np.random.default_rng(seed).permutation(len(data))
    n_eval = min(len(data) - 1, max(1, round(len(data) * eval_fraction)))
    ev = [data.samples[i] for i in sorted(order[:n_eval])]
    cal = [data.samples[i] for i in sorted(order[n_eval:])]
    return (DataSet(cal, data.origin, data.synthetic, list(data.notes)),
            DataSet(ev, data.origin, data.synthetic, list(data.notes)))


def check_sample(sample: Sample, inputs: list[TensorSpec], where: str) -> None:
    names = {i.name for i in inputs}
    missing, extra = names - sample.keys(), sample.keys() - names
    if missing or extra:
        raise CalibrationError(f"{where}: arrays {sorted(sample)} do not match model inputs {sorted(names)}")
    for spec in inputs:
        a = sample[spec.name]
        if a.ndim != len(spec.shape) or any(isinstance(d, int) and d != s for d, s in zip(spec.shape, a.shape,
                                                                                       strict=True)):
            raise CalibrationError(f"{where}: input {spec.name!r} expects shape {_dims(spec.shape)}, "
                                   f"got {_dims(a.shape)}")
        if a.dtype != spec.dtype:
            raise CalibrationError(f"{where}: input {spec.name!r} expects {spec.dtype}, got {a.dtype}")
        if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
            raise CalibrationError(f"{where}: input {spec.name!r} contains NaN or infinity")


def _dims(shape: tuple[int | str | None, ...]) -> str:
    return "[" + ",".join(str(d) if isinstance(d, int) else f"{d or '?'}" for d in shape) + "]"


def _read_npz(path: Path, budget: ByteBudget) -> dict[str, np.ndarray]:
    _check_npz_sizes(path, budget)
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except DataTooLargeError:
        raise
    except Exception as e:
        raise CalibrationError(f"{path}: not a readable .npz ({e})") from e


def _check_npz_sizes(path: Path, budget: ByteBudget) -> None:
    """Every member's declared size and every array's header, before numpy decompresses anything. A member is
    never read past its declared size (zipfile enforces it), and numpy allocates what the header says."""
    try:
        with zipfile.ZipFile(path) as z:
            members = z.infolist()
            if len(members) > MAX_ARRAYS:
                raise CalibrationError(f"{path}: holds {len(members)} arrays; at most {MAX_ARRAYS} are accepted")
            budget.check(sum(m.file_size for m in members), str(path))
            for member in members:
                if not member.filename.endswith(".npy"):
                    continue
                with z.open(member) as f:
                    header_bytes, nbytes = _npy_header(f, str(path))
                if header_bytes + nbytes > member.file_size:
                    raise CalibrationError(f"{path}: an array's header promises more data than the archive holds")
                budget.spend(nbytes, str(path))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError) as e:
        raise CalibrationError(f"{path}: not a readable .npz ({e})") from e


def _npy_header(f, where: str) -> tuple[int, int]:
    """The header's length and the array's byte size, from the header alone."""
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise CalibrationError(f"{where}: .npy format version {version} is not supported (save with numpy)")
    except CalibrationError:
        raise
    except (ValueError, EOFError) as e:
        raise CalibrationError(f"{where}: not a readable .npy ({e})") from e
    if dtype.hasobject:
        raise CalibrationError(f"{where}: holds Python objects; only numeric arrays are accepted")
    return f.tell(), math.prod(shape) * dtype.itemsize


def _read_npy(path: Path, budget: ByteBudget) -> np.ndarray:
    try:
        with path.open("rb") as f:
            header_bytes, nbytes = _npy_header(f, str(path))
    except OSError as e:
        raise CalibrationError(f"{path}: not a readable .npy ({e})") from e
    if header_bytes + nbytes > path.stat().st_size:
        raise CalibrationError(f"{path}: the header promises more data than the file holds")
    budget.spend(nbytes, str(path))
    try:
        return np.load(path, allow_pickle=False)
    except Exception as e:
        raise CalibrationError(f"{path}: not a readable .npy ({e})") from e


def _coerce(a: np.ndarray, spec: TensorSpec, where: str) -> np.ndarray:
    """Accept another width of the same kind (float64 data for a float32 input, int32 ids for int64); refuse a
    change of kind: uint8 pixels fed to a float input would calibrate on unnormalized values."""
    if a.dtype == spec.dtype:
        return a
    if a.dtype.kind == spec.dtype.kind and np.can_cast(a.dtype, spec.dtype, casting="same_kind"):
        return a.astype(spec.dtype)
    raise CalibrationError(f"{where}: input {spec.name!r} expects {spec.dtype}, got {a.dtype}")


def _from_arrays(arrays: dict[str, np.ndarray], inputs: list[TensorSpec], where: str) -> list[Sample]:
    if len(inputs) == 1 and len(arrays) == 1 and inputs[0].name not in arrays:
        arrays = {inputs[0].name: next(iter(arrays.values()))}
    names = {i.name for i in inputs}
    if set(arrays) != names:
        raise CalibrationError(f"{where}: arrays {sorted(arrays)} do not match model inputs {sorted(names)}")
    per_input: dict[str, list[np.ndarray]] = {}
    for spec in inputs:
        a = _coerce(arrays[spec.name], spec, where)
        rank = len(spec.shape)
        if a.ndim == rank + 1:
            per_input[spec.name] = list(a)
        elif a.ndim == rank and rank > 0:
            per_input[spec.name] = [a[i : i + 1] for i in range(a.shape[0])]
        else:
            raise CalibrationError(f"{where}: input {spec.name!r} expects samples of shape {_dims(spec.shape)} "
                                   f"(or a stack of them), got an array of shape {list(a.shape)}")
    counts = {k: len(v) for k, v in per_input.items()}
    if len(set(counts.values())) > 1:
        raise CalibrationError(f"{where}: inputs hold different sample counts {counts}")
    n = next(iter(counts.values()))
    return [{k: v[i] for k, v in per_input.items()} for i in range(n)]


def _from_npy_folder(folder: Path, inputs: list[TensorSpec], budget: ByteBudget) -> list[Sample]:
    if len(inputs) == 1:
        files = sorted(folder.glob("*.npy"))
        if not files:
            raise CalibrationError(f"{folder}: no .npy files or images")
        samples: list[Sample] = []
        for f in files:
            samples += _from_arrays({inputs[0].name: _read_npy(f, budget)}, inputs, str(f))
        return samples
    columns: dict[str, list[Path]] = {}
    for spec in inputs:
        sub = folder / spec.name
        if not sub.is_dir():
            raise CalibrationError(f"{folder}: a model with inputs {[i.name for i in inputs]} needs one sub-folder "
                                   f"per input; {sub.name}/ is missing")
        columns[spec.name] = sorted(sub.glob("*.npy"))
    names = {k: [p.name for p in v] for k, v in columns.items()}
    first = next(iter(names.values()))
    if any(v != first for v in names.values()):
        raise CalibrationError(f"{folder}: the per-input sub-folders must hold the same file names")
    samples = []
    for i in range(len(first)):
        samples += _from_arrays({k: _read_npy(v[i], budget) for k, v in columns.items()}, inputs,
                                f"{folder}/*/{first[i]}")
    return samples


def _from_images(files: list[Path], inputs: list[TensorSpec], prep: ImagePrep, limit: int) -> list[Sample]:
    from PIL import Image, UnidentifiedImageError

    if len(inputs) != 1:
        raise CalibrationError("image folders fit single-input models only")
    spec = inputs[0]
    if len(spec.shape) != 4:
        raise CalibrationError(f"image folders need a 4-D image input; {spec.describe()} is not")
    channels = spec.shape[1] if prep.layout == "NCHW" else spec.shape[3]
    channels = channels if isinstance(channels, int) else 3
    if channels not in (1, 3):
        raise CalibrationError(f"input {spec.describe()} has {channels} channels in layout {prep.layout}; "
                               "images give 1 or 3 (is --layout right?)")
    mean = np.asarray(prep.mean[:channels], np.float32)
    std = np.asarray(prep.std[:channels], np.float32)
    samples = []
    for f in files[:limit]:
        try:
            with Image.open(f) as im:
                im = im.convert("L" if channels == 1 else "RGB").resize((prep.width, prep.height),
                                                                        Image.Resampling.BILINEAR)
                a = np.asarray(im, np.float32)
        except (UnidentifiedImageError, OSError) as e:
            raise CalibrationError(f"{f}: not a readable image ({e})") from e
        a = a[..., None] if a.ndim == 2 else a
        if prep.channel_order == "BGR" and channels == 3:
            a = a[..., ::-1]
        a = (a * prep.scale - mean) / std
        if prep.layout == "NCHW":
            a = a.transpose(2, 0, 1)
        samples.append({spec.name: np.ascontiguousarray(a[None]).astype(spec.dtype)})
    return samples
