"""Uploaded models and data that attack the converter: pickles in a .pt2 (torch.export.load would run them) and
decompression bombs in calibration data. Each attack is built here, for real."""

import io
import json
import pickle
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from converters.calibration import load_dataset
from converters.errors import CalibrationError, DataTooLargeError, UnsafeModelError
from converters.source import TensorSpec, load_source

IMAGE = [TensorSpec("x", np.dtype("float32"), (1, 3, 16, 16))]


class _Marker:
    """Unpickling this creates ``path``: proof that a pickle ran."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.conv(x) * torch.tensor([2.0])  # a lifted constant: data/constants/tensor_0


def plain_pt2(path: Path) -> Path:
    torch.export.save(torch.export.export(_Net().eval(), (torch.randn(1, 3, 16, 16),)), str(path))
    return path


def rewrite_pt2(src: Path, dst: Path, edit: Callable[[str, bytes], bytes | None], add: dict[str, bytes] | None = None):
    """Copy the archive member by member (names relative to its root folder); ``edit`` returns new bytes, or None
    to drop the member."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        root = zin.namelist()[0].split("/")[0]
        for info in zin.infolist():
            data = edit(info.filename.removeprefix(root + "/"), zin.read(info.filename))
            if data is not None:
                zout.writestr(info, data)
        for name, data in (add or {}).items():
            zout.writestr(f"{root}/{name}", data)
    return dst


def malicious_edit(marker: Path) -> Callable[[str, bytes], bytes]:
    """The weights config says ``use_pickle`` and weight_0 is a pickle whose unpickling creates ``marker``."""
    payload = pickle.dumps(_Marker(marker))

    def edit(name: str, data: bytes) -> bytes:
        if name == "data/weights/model_weights_config.json":
            config = json.loads(data)
            config["config"]["conv.weight"]["use_pickle"] = True
            return json.dumps(config).encode()
        return payload if name == "data/weights/weight_0" else data

    return edit


def malicious_pt2(src: Path, dst: Path, marker: Path) -> Path:
    return rewrite_pt2(src, dst, malicious_edit(marker))


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> Path:
    return plain_pt2(tmp_path_factory.mktemp("pt2") / "net.pt2")


def test_security_the_malicious_pt2_really_runs_code_in_torch_export_load(plain, tmp_path):
    """The attack the other tests refuse is real: torch 2.13's own loader runs it."""
    marker = tmp_path / "ran"
    bad = malicious_pt2(plain, tmp_path / "bad.pt2", marker)
    with pytest.raises(Exception):  # noqa: B017 - torch fails after the pickle ran; which error is torch's business
        torch.export.load(str(bad))
    assert marker.exists()


def _constants_pickled(marker):
    payload = pickle.dumps(_Marker(marker))

    def edit(name, data):
        if name == "data/constants/model_constants_config.json":
            config = json.loads(data)
            next(iter(config["config"].values()))["use_pickle"] = True
            return json.dumps(config).encode()
        return payload if name == "data/constants/tensor_0" else data

    return edit, {}


def _opaque_constant(marker):
    payload = pickle.dumps(_Marker(marker))

    def edit(name, data):
        if name == "data/constants/model_constants_config.json":
            config = json.loads(data)
            next(iter(config["config"].values()))["path_name"] = "opaque_obj_0"  # torch: pickle.loads, always
            return json.dumps(config).encode()
        return data

    return edit, {"data/constants/opaque_obj_0": payload}


def _legacy_weights(marker):
    def edit(name, data):
        return None if name == "data/weights/model_weights_config.json" else data

    return edit, {"data/weights/model.pt": pickle.dumps(_Marker(marker))}


def _compiled_code(marker):
    return (lambda name, data: data), {"data/aotinductor/model/model.so": b"\x7fELF not really"}


def _stray_pickle(marker):
    return (lambda name, data: data), {"data/weights/helper.pt": pickle.dumps(_Marker(marker))}


@pytest.mark.parametrize(("attack", "message"), [
    (lambda m: (malicious_edit(m), {}), "weights are stored as pickled"),
    (_constants_pickled, "constants are stored as pickled"),
    (_opaque_constant, "constants are stored as pickled"),
    (_legacy_weights, "older .pt2 layout"),
    (_compiled_code, "compiled native code"),
    (_stray_pickle, "torch.export.save does not write"),
])
def test_security_pt2_that_would_unpickle_or_load_code_is_refused_before_loading(plain, tmp_path, attack, message):
    marker = tmp_path / "ran"
    edit, extra = attack(marker)
    bad = rewrite_pt2(plain, tmp_path / "bad.pt2", edit, extra)
    with pytest.raises(UnsafeModelError) as refused:
        load_source(bad, tmp_path / "w")
    assert not marker.exists()
    assert message in str(refused.value)


def test_security_pt2_sample_inputs_are_never_unpickled(plain, tmp_path):
    """torch unpickles the sample inputs with weights_only=False when the safe unpickler refuses them; we never
    read them, and the program still exports."""
    marker = tmp_path / "ran"
    payload = pickle.dumps(_Marker(marker))
    bad = rewrite_pt2(plain, tmp_path / "bad.pt2",
                      lambda name, data: payload if name == "data/sample_inputs/model.pt" else data)
    try:
        source = load_source(bad, tmp_path / "w")
    finally:
        assert not marker.exists()
    assert [i.describe() for i in source.inputs] == ["x[1,3,16,16] float32"]


# ----------------------------------------------------------------------------- calibration data bombs


def zero_bomb(path: Path, nbytes: int, *, name: str = "x.npy", shape_tail=(3, 16, 16)) -> Path:
    """An .npz holding ``nbytes`` of float32 zeros, written in 16 MiB blocks: a few MB on disk."""
    per_sample = int(np.prod(shape_tail)) * 4
    count = nbytes // per_sample
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False,
                                                  "shape": (count, *shape_tail)})
    block, left = bytes(16 << 20), count * per_sample
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as z, \
            z.open(name, "w", force_zip64=True) as f:
        f.write(header.getvalue())
        while left:
            f.write(block[: min(left, len(block))])
            left -= min(left, len(block))
    return path


def test_security_npz_bomb_is_refused_before_decompressing(tmp_path):
    bomb = zero_bomb(tmp_path / "bomb.npz", 1100 << 20)  # 1.1 GiB of zeros; the default limit is 1 GiB
    assert bomb.stat().st_size < 8 << 20
    # Measured in a fresh process: this test process's own peak says nothing.
    code = ("import sys; from pathlib import Path; import numpy as np\n"
            "from converters.calibration import load_dataset\nfrom converters.errors import DataTooLargeError\n"
            "from converters.source import TensorSpec\n"
            "def peak(): return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM'))\n"
            "before = peak()\n"
            "try:\n    load_dataset(Path(sys.argv[1]), [TensorSpec('x', np.dtype('float32'), (1, 3, 16, 16))])\n"
            "except DataTooLargeError as e:\n    print('refused', e)\n"
            "print('grew_kb', peak() - before)\n")
    run = subprocess.run([sys.executable, "-c", code, str(bomb)], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[2])
    assert "refused" in run.stdout and "MiB once decompressed" in run.stdout, run.stdout + run.stderr
    grew_mb = int(run.stdout.split("grew_kb")[1]) / 1024
    assert grew_mb < 50, f"peak RSS grew {grew_mb:.0f} MB while refusing"


def _lying_member(path: Path) -> Path:
    """A tiny member whose .npy header promises a GiB: numpy would allocate what the header says."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (1 << 28,)})
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("x.npy", header.getvalue() + bytes(64))
    return path


def _lying_npy(path: Path) -> Path:
    path = path.with_suffix(".npy")
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (1 << 28,)})
    path.write_bytes(header.getvalue() + bytes(64))
    return path


@pytest.mark.parametrize(("make", "error", "message"), [
    (lambda p: zero_bomb(p, 80 << 20), DataTooLargeError, "more than 64 MiB once decompressed"),
    (_lying_member, CalibrationError, "promises more data than the archive holds"),
    (_lying_npy, CalibrationError, "promises more data than the file holds"),
])
def test_security_data_sizes_are_checked_from_headers(tmp_path, make, error, message):
    with pytest.raises(error, match=message):
        load_dataset(make(tmp_path / "data.npz"), IMAGE, max_bytes=64 << 20)


def test_security_npy_folder_shares_one_budget(tmp_path):
    folder = tmp_path / "calib"
    folder.mkdir()
    for i in range(3):
        np.save(folder / f"{i}.npy", np.zeros((100, 3, 16, 16), np.float32))  # 300 KiB each
    assert len(load_dataset(folder, IMAGE, max_bytes=1 << 20)) == 300
    with pytest.raises(DataTooLargeError):
        load_dataset(folder, IMAGE, max_bytes=700 << 10)


def test_security_plain_data_still_loads(tmp_path):
    np.savez(tmp_path / "c.npz", x=np.random.default_rng(0).standard_normal((8, 3, 16, 16)).astype(np.float32))
    assert len(load_dataset(tmp_path / "c.npz", IMAGE)) == 8
