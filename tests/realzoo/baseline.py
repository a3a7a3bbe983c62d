"""Baseline: each zoo model's task accuracy in FP32 and after ONNX Runtime's plain ``quantize_static`` (QDQ,
per-channel, uint8 asymmetric activations, int8 weights, MinMax), once with the default op types and once with
only Conv/MatMul/Gemm. Prints a Markdown table and writes JSON to bench/results/realzoo_baseline.json.

    python -m tests.realzoo.baseline [NAME...]

The FP32 model is the working copy ``converters.source.load_source`` writes (for a .pt2: its ONNX export; for an
opset < 13 model: upgraded to 13, which per-channel QDQ needs)."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from tests import realzoo
from tests.realzoo.recipe import Prepared
from tests.realzoo.runner import run_onnx

RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results" / "realzoo_baseline.json"
VARIANTS = {"qdq_default": None, "qdq_conv_matmul_gemm": ["Conv", "MatMul", "Gemm"]}
# paddle2onnx (the PP-OCR models) stores every weight in a Constant node; quantize_static quantizes initializers
# only, so those models keep FP32 weights (size ratio ~1) unless the constants become initializers first.
CONSTANTS_VARIANT = "qdq_conv_matmul_gemm_constants_as_initializers"


class NpzReader:
    """onnxruntime's CalibrationDataReader over the prepared calibration samples."""

    def __init__(self, samples: list[dict]) -> None:
        self.samples = iter(samples)

    def get_next(self) -> dict | None:
        return next(self.samples, None)


def quantize(fp32: Path, out: Path, prepared: Prepared, op_types: list[str] | None) -> Path:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    quantize_static(str(fp32), str(out), NpzReader(prepared.calibration_samples()), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax, op_types_to_quantize=op_types)
    return out


def constants_to_initializers(model_path: Path, out: Path) -> Path | None:
    """A copy whose tensor-valued Constant nodes are initializers; None when the model has none."""
    import onnx

    model = onnx.load(str(model_path))
    constants = [n for n in model.graph.node if n.op_type == "Constant" and len(n.attribute) == 1
                 and n.attribute[0].name == "value"]
    if not constants:
        return None
    for node in constants:
        tensor = onnx.TensorProto()
        tensor.CopyFrom(node.attribute[0].t)
        tensor.name = node.output[0]
        model.graph.initializer.append(tensor)
        model.graph.node.remove(node)
    onnx.save(model, str(out))
    return out


def measure(name: str, work: Path) -> dict:
    from converters.source import load_source

    prepared = realzoo.prepare(name)
    source = load_source(prepared.model, work / name)
    samples = prepared.evaluation_samples()
    row: dict = {"name": name, "source_bytes": source.size_bytes, "fp32_onnx_bytes": source.path.stat().st_size,
                 "notes": source.notes}
    start = time.monotonic()
    row["fp32"] = prepared.score(run_onnx(source.path, samples))
    row["fp32_eval_s"] = round(time.monotonic() - start, 2)
    for variant, op_types in VARIANTS.items():
        try:
            start = time.monotonic()
            quantized = quantize(source.path, work / name / f"{variant}.onnx", prepared, op_types)
            row[f"{variant}_quantize_s"] = round(time.monotonic() - start, 2)
            row[variant] = prepared.score(run_onnx(quantized, samples))
            row[f"{variant}_size_ratio"] = round(quantized.stat().st_size / source.path.stat().st_size, 3)
        except Exception as e:  # one model failing to quantize is a result, not the end of the run
            row[variant] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    unfolded = constants_to_initializers(source.path, work / name / "constants_as_initializers.onnx")
    if unfolded:
        quantized = quantize(unfolded, work / name / f"{CONSTANTS_VARIANT}.onnx", prepared, VARIANTS[
            "qdq_conv_matmul_gemm"])
        row[CONSTANTS_VARIANT] = prepared.score(run_onnx(quantized, samples))
        row[f"{CONSTANTS_VARIANT}_size_ratio"] = round(quantized.stat().st_size / source.path.stat().st_size, 3)
    return row


def fmt(scores: dict) -> str:
    if "error" in scores:
        return "error: " + scores["error"][:60]
    return ", ".join(f"{k} {v:.3f}" for k, v in scores.items())


def table(rows: list[dict]) -> str:
    lines = ["| model | FP32 | QDQ default ops | size | QDQ Conv/MatMul/Gemm | size |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {fmt(r['fp32'])} | {fmt(r['qdq_default'])} | "
                     f"{r.get('qdq_default_size_ratio', '-')} | {fmt(r['qdq_conv_matmul_gemm'])} | "
                     f"{r.get('qdq_conv_matmul_gemm_size_ratio', '-')} |")
    extra = [r for r in rows if CONSTANTS_VARIANT in r]
    if extra:
        lines += ["", "Constant-node weights moved to initializers first, then QDQ Conv/MatMul/Gemm:", "",
                  "| model | QDQ Conv/MatMul/Gemm | size |", "|---|---|---|"]
        lines += [f"| {r['name']} | {fmt(r[CONSTANTS_VARIANT])} | {r[f'{CONSTANTS_VARIANT}_size_ratio']} |"
                  for r in extra]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.realzoo.baseline")
    parser.add_argument("names", nargs="*", help="models (default: all)")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="realzoo-baseline-") as tmp:
        for name in args.names or realzoo.names():
            rows.append(measure(name, Path(tmp)))
            print(f"{name}: {json.dumps({k: v for k, v in rows[-1].items() if k != 'notes'})}", file=sys.stderr)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    earlier = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
    measured = {r["name"] for r in rows}  # a partial run updates its models' rows and keeps the others
    rows = [r for r in earlier if r["name"] not in measured and r["name"] in realzoo.names()] + rows
    rows.sort(key=lambda r: realzoo.names().index(r["name"]))
    RESULTS.write_text(json.dumps(rows, indent=1))
    print(table(rows))
    print(f"\nJSON: {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
