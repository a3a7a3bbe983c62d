import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from converters.calibration import ImagePrep, load_dataset, split, synthetic_dataset
from converters.errors import CalibrationError, InvalidModelError, UnsupportedOpError
from converters.source import TensorSpec, load_source
from tests import zoo

from .conftest import random_npz

IMAGE = [TensorSpec("input", np.dtype("float32"), (1, 3, 8, 8))]


def test_valid_model_loads_with_inputs_outputs_and_hash(mobilenet, tmp_path):
    s = load_source(mobilenet, tmp_path)
    assert [i.describe() for i in s.inputs] == ["input[1,3,64,64] float32"]
    assert s.outputs[0].name == "logits" and s.opset == 17 and len(s.sha256) == 64 and not s.external_data


def test_not_a_model_is_a_clear_error(tmp_path):
    bad = tmp_path / "notes.onnx"
    bad.write_text("this is a shopping list, not a network")
    with pytest.raises(InvalidModelError, match="not an ONNX model"):
        load_source(bad, tmp_path / "w")


def test_truncated_model_is_a_clear_error(mobilenet, tmp_path):
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(mobilenet.read_bytes()[: mobilenet.stat().st_size // 2])
    with pytest.raises(InvalidModelError, match="truncated|checker"):
        load_source(cut, tmp_path / "w")


@pytest.mark.parametrize("make", [lambda p: p.write_bytes(b""), lambda p: p.mkdir(), lambda p: None])
def test_empty_directory_or_missing_path_is_a_clear_error(tmp_path, make):
    target = tmp_path / "model.onnx"
    make(target)
    with pytest.raises(InvalidModelError, match="empty|directory|no such file"):
        load_source(target, tmp_path / "w")


def test_unsupported_op_names_the_op(tmp_path):
    with pytest.raises(UnsupportedOpError, match="com.example.custom::FancyWarp"):
        load_source(zoo.unsupported_op(tmp_path / "custom.onnx"), tmp_path / "w")


def test_model_failing_the_checker_is_refused(tmp_path):
    m = onnx.load(str(zoo.mlp_opset(tmp_path / "m.onnx", opset=13)))
    m.graph.node[0].input[1] = "no_such_weight"
    onnx.save(m, str(tmp_path / "broken.onnx"))
    with pytest.raises(InvalidModelError, match="checker"):
        load_source(tmp_path / "broken.onnx", tmp_path / "w")


def test_old_opset_is_upgraded_for_per_channel(tmp_path):
    s = load_source(zoo.mlp_opset(tmp_path / "old.onnx", opset=11), tmp_path / "w")
    assert s.original_opset == 11 and s.opset == 13
    assert any("upgraded opset 11 → 13" in n for n in s.notes)


def test_external_data_model_loads_and_hashes_its_data(mobilenet, tmp_path):
    m = onnx.load(str(mobilenet))
    onnx.save_model(m, str(tmp_path / "ext.onnx"), save_as_external_data=True, location="ext.weights",
                    size_threshold=0)
    s = load_source(tmp_path / "ext.onnx", tmp_path / "w")
    assert s.external_data and s.size_bytes > (tmp_path / "ext.onnx").stat().st_size
    (tmp_path / "ext.weights").unlink()
    with pytest.raises(InvalidModelError, match="external data"):
        load_source(tmp_path / "ext.onnx", tmp_path / "w2")


def test_dynamic_batch_can_be_pinned(tmp_path):
    path = zoo.mobilenet_like(tmp_path / "dyn.onnx", dynamic_batch=True, width=8, blocks=1)
    assert load_source(path, tmp_path / "a").inputs[0].shape[0] == "batch"
    pinned = load_source(path, tmp_path / "b", input_shapes={"input": (2, 3, 64, 64)})
    assert pinned.inputs[0].shape == (2, 3, 64, 64)
    with pytest.raises(InvalidModelError, match="no input 'image'"):
        load_source(path, tmp_path / "c", input_shapes={"image": (1, 3, 64, 64)})
    with pytest.raises(InvalidModelError, match="rank 3 given"):
        load_source(path, tmp_path / "d", input_shapes={"input": (1, 3, 64)})


def test_pytorch_exported_program_is_exported_to_onnx(tmp_path):
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(288, 4))
    torch.export.save(torch.export.export(net.eval(), (torch.randn(1, 3, 8, 8),)), str(tmp_path / "net.pt2"))
    s = load_source(tmp_path / "net.pt2", tmp_path / "w")
    assert s.inputs[0].shape == (1, 3, 8, 8) and any("ExportedProgram" in n for n in s.notes)
    (tmp_path / "junk.pt2").write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(InvalidModelError, match="not a PyTorch ExportedProgram"):
        load_source(tmp_path / "junk.pt2", tmp_path / "w2")


# ----------------------------------------------------------------------------- calibration data


def test_npz_stack_is_split_into_batch1_samples(tmp_path):
    d = load_dataset(random_npz(tmp_path / "c.npz", input=(10, 3, 8, 8)), IMAGE)
    assert len(d) == 10 and d.samples[0]["input"].shape == (1, 3, 8, 8) and not d.synthetic


def test_npz_with_wrong_shape_names_input_and_shapes(tmp_path):
    with pytest.raises(CalibrationError, match=r"'input' expects .*\[1,3,8,8\].*got \[1,3,16,16\]"):
        load_dataset(random_npz(tmp_path / "c.npz", input=(10, 3, 16, 16)), IMAGE)


def test_npz_with_wrong_names_lists_model_inputs(tmp_path):
    two = [TensorSpec("image", np.dtype("float32"), (1, 4)), TensorSpec("meta", np.dtype("float32"), (1, 2))]
    with pytest.raises(CalibrationError, match=r"do not match model inputs \['image', 'meta'\]"):
        load_dataset(random_npz(tmp_path / "c.npz", image=(5, 4), extra=(5, 2)), two)


def test_wrong_dtype_and_nan_are_refused(tmp_path):
    np.savez(tmp_path / "int.npz", input=np.ones((4, 3, 8, 8), np.int32))
    with pytest.raises(CalibrationError, match="expects float32, got int32"):
        load_dataset(tmp_path / "int.npz", IMAGE)
    bad = np.zeros((4, 3, 8, 8), np.float32)
    bad[2, 0, 0, 0] = np.nan
    np.savez(tmp_path / "nan.npz", input=bad)
    with pytest.raises(CalibrationError, match="NaN"):
        load_dataset(tmp_path / "nan.npz", IMAGE)


def test_folder_of_npy_single_and_multi_input(tmp_path):
    for i in range(3):
        np.save(tmp_path / f"{i}.npy", np.ones((1, 3, 8, 8), np.float32) * i)
    assert len(load_dataset(tmp_path, IMAGE)) == 3
    two = [TensorSpec("a", np.dtype("float32"), (1, 2)), TensorSpec("b", np.dtype("float32"), (1, 3))]
    multi = tmp_path / "multi"
    for name, width in (("a", 2), ("b", 3)):
        (multi / name).mkdir(parents=True)
        for i in range(4):
            np.save(multi / name / f"s{i}.npy", np.full((1, width), i, np.float32))
    d = load_dataset(multi, two)
    assert len(d) == 4 and d.samples[3]["b"].tolist() == [[3.0, 3.0, 3.0]]
    (multi / "b" / "s3.npy").unlink()
    with pytest.raises(CalibrationError, match="same file names"):
        load_dataset(multi, two)


@pytest.mark.parametrize(("layout", "order"), [("NCHW", "RGB"), ("NHWC", "BGR")])
def test_image_folder_with_declared_preprocessing(tmp_path, layout, order):
    for i in range(3):
        Image.fromarray(np.full((20, 30, 3), (255, 0, 0), np.uint8)).save(tmp_path / f"{i}.png")
    shape = (1, 3, 8, 8) if layout == "NCHW" else (1, 8, 8, 3)
    prep = ImagePrep(8, 8, layout, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), channel_order=order)
    d = load_dataset(tmp_path, [TensorSpec("input", np.dtype("float32"), shape)], image_prep=prep)
    x = d.samples[0]["input"]
    red = x[0, :, 0, 0] if layout == "NCHW" else x[0, 0, 0, :]
    assert x.shape == shape and red.tolist() == ([1.0, -1.0, -1.0] if order == "RGB" else [-1.0, -1.0, 1.0])
    with pytest.raises(CalibrationError, match="preprocessing declared"):
        load_dataset(tmp_path, IMAGE)


def test_split_is_seeded_and_reports_counts():
    d = synthetic_dataset(IMAGE, 20)
    cal, ev = split(d, 0.25)
    assert (len(cal), len(ev)) == (15, 5) and cal.synthetic and ev.synthetic
    assert split(d, 0.25)[1].sha256() == ev.sha256() != cal.sha256()
    with pytest.raises(CalibrationError, match="at least 2"):
        split(synthetic_dataset(IMAGE, 1), 0.5)


def test_synthetic_calibration_is_marked_and_needs_static_dims():
    d = synthetic_dataset(IMAGE, 4)
    assert d.synthetic and "SYNTHETIC" in d.notes[0]
    with pytest.raises(CalibrationError, match="--input-shape"):
        synthetic_dataset([TensorSpec("x", np.dtype("float32"), (1, "seq", 8))], 2)
