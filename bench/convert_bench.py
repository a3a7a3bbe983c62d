"""Converter benchmark: our per-profile pipeline side by side with ONNX Runtime's plain `quantize_static` defaults,
then the mobile targets (TFLite INT8 under LiteRT, Core ML 8-bit) with conversion time and peak memory, on the
synthetic stand-ins; ``--real`` runs the real-model table instead (bench/real_models.py: published models from
PyPI wheels, scored against ground truth).

Same models, same calibration and evaluation data, same run. Prints Markdown tables and writes JSON to
bench/results/convert_bench.json. Usage: python bench/convert_bench.py [--quick] [--only onnx|mobile] [--real]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from onnxruntime.quantization import quantize_static

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from converters import runtime  # noqa: E402
from converters.calibration import DataSet, split, synthetic_dataset  # noqa: E402
from converters.fidelity import OutputFidelity, primary_metric  # noqa: E402
from converters.onnx_int8 import SampleReader  # noqa: E402
from converters.pipeline import Converter, ConvertOptions  # noqa: E402
from converters.source import load_source  # noqa: E402
from converters.targets.base import fidelity  # noqa: E402
from firmware_profiles import load_profile  # noqa: E402
from tests import zoo  # noqa: E402

PROFILES = ["rpi4", "rpi5", "jetson-orin-nano"]
MOBILE = [("android-arm64", "tflite-int8"), ("ios-a15", "coreml-int8")]


def task_metric(outputs: list[OutputFidelity]) -> tuple[str, float | None]:
    """The figure that says whether the model still does its job: the worst output's task metric."""
    return min((primary_metric(o) for o in outputs), key=lambda m: m[1]) if outputs else ("-", None)


def models(work: Path, quick: bool) -> list[tuple[str, Path, DataSet]]:
    out = []
    size, width, blocks = (96, 32, 3) if quick else (128, 64, 4)
    m = zoo.mobilenet_like(work / "mobilenet.onnx", size=size, width=width, blocks=blocks)
    out.append((f"MobileNet-like ({size}px)", m, synthetic_dataset(load_source(m, work / "i1").inputs, 64)))
    d, _ = zoo.trained_digits_classifier(work / "digits.onnx")
    _, _, x, _ = zoo.digits_data()
    out.append(("digits CNN (real data)", d, DataSet([{"image": x[i:i + 1]} for i in range(len(x))], "digits")))
    g = zoo.grouped_conv_net(work / "grouped.onnx", size=48)
    out.append(("grouped-conv net (no fast INT8 kernel)", g, synthetic_dataset(load_source(g, work / "i4").inputs, 32)))
    t = zoo.transformer_block(work / "transformer.onnx")
    out.append(("transformer block", t, synthetic_dataset(load_source(t, work / "i2").inputs, 64)))
    det = zoo.mixed_range_detector(work / "detector.onnx")
    out.append(("YOLO-style mixed-range head", det, synthetic_dataset(load_source(det, work / "i3").inputs, 64)))
    rec = zoo.recognizer(work / "recognizer.onnx")
    images, _ = zoo.digit_strings(240, seed=7)
    out.append(("text recognizer (outlier channel)", rec,
                DataSet([{"image": images[i:i + 1]} for i in range(len(images))], "digit lines")))
    return out


def plain_row(name: str, model: Path, cal: DataSet, ev: DataSet, work: Path, runs: int) -> dict:
    out = work / f"{model.stem}.plain.onnx"
    t0 = time.perf_counter()
    quantize_static(str(model), str(out), SampleReader(cal.samples))
    seconds = time.perf_counter() - t0
    fp32, int8 = runtime.session(model), runtime.session(out)
    ref, got = runtime.run_all(fp32, ev.samples), runtime.run_all(int8, ev.samples)
    judge = Converter(load_source(model, work / f"{model.stem}-plain"), cal, ev, work / f"{model.stem}-plain")
    fid = fidelity(judge.tasks, ref, got)  # the same task metrics our gate reads
    lat = runtime.compare_latency(fp32, int8, ev.samples[0], runs=runs)
    metric, value = task_metric(fid)
    return dict(model=name, pipeline="ORT quantize_static defaults", status="(no gate)",
                fp32_bytes=model.stat().st_size, int8_bytes=out.stat().st_size,
                size_ratio=out.stat().st_size / model.stat().st_size, metric=metric, task_value=value,
                cosine=min(f.cosine for f in fid), fp32_ms=lat.fp32_ms, int8_ms=lat.int8_ms,
                latency_ratio=lat.ratio, float_nodes=0, convert_s=seconds)


def mobile_models(work: Path, quick: bool) -> list[tuple[str, Path, DataSet]]:
    size, width, blocks = (96, 32, 3) if quick else (128, 64, 4)
    m = zoo.mobilenet_like(work / "mobilenet.onnx", size=size, width=width, blocks=blocks)
    d, _ = zoo.trained_digits_classifier(work / "digits.onnx")
    _, _, x, _ = zoo.digits_data()
    two = zoo.two_in_two_out(work / "two.onnx")
    t = zoo.transformer_block(work / "transformer.onnx")
    g = zoo.recurrent(work / "gru.onnx")
    return [(f"MobileNet-like ({size}px)", m, synthetic_dataset(load_source(m, work / "m1").inputs, 64)),
            ("digits CNN (real data)", d, DataSet([{"image": x[i:i + 1]} for i in range(len(x))], "digits")),
            ("two inputs, two outputs", two, synthetic_dataset(load_source(two, work / "m2").inputs, 64)),
            ("transformer block", t, synthetic_dataset(load_source(t, work / "m3").inputs, 64)),
            ("GRU classifier", g, synthetic_dataset(load_source(g, work / "m4").inputs, 64))]


def mobile_rows(work: Path, quick: bool, runs: int) -> list[dict]:
    rows = []
    for name, model, data in mobile_models(work, quick):
        cal, ev = split(data, 0.3)
        source = load_source(model, work / f"{model.stem}-mobile")
        conv = Converter(source, cal, ev, work / f"{model.stem}-mobile", ConvertOptions(latency_runs=runs))
        for pid, fmt in MOBILE:
            r = next(r for r in conv.convert(load_profile(pid), work / "mobile-out") if r.format == fmt)
            row = dict(model=name, target=f"{fmt} ({pid})", status=r.status.value, reason=r.reasons[0][:90]
                       if r.reasons else "", size_ratio=r.size.ratio if r.size else None,
                       cosine=min(f.cosine for f in r.fidelity) if r.fidelity else None,
                       task_value=task_metric(r.fidelity)[1] if r.fidelity else None,
                       fp32_ms=r.latency.fp32_ms if r.latency else None,
                       int8_ms=r.latency.int8_ms if r.latency else None,
                       latency_ratio=r.latency.ratio if r.latency else None, convert_s=None, peak_rss_mb=None,
                       fidelity_by="LiteRT" if r.fidelity and fmt.startswith("tflite") else None)
            info = r.tflite or r.coreml
            if info is not None:
                row.update(convert_s=info.conversion_seconds, peak_rss_mb=info.conversion_peak_rss_mb)
            if r.coreml is not None:
                row["fidelity_by"] = "host simulation" if not r.coreml.numeric_fidelity_measured else "Core ML"
            rows.append(row)
        print(f"  done: {name}", file=sys.stderr, flush=True)
    return rows


def print_mobile(rows: list[dict]) -> None:
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    print("\n| model | target | status | size ratio | top-1 | cosine | fidelity by | LiteRT FP32 → INT8 (ms) | ratio "
          "| convert (s) | peak RSS (MB) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        status = r["status"] + (f": {r['reason']}" if r["status"] != "shippable" and r["reason"] else "")
        print(f"| {r['model']} | {r['target']} | {status} | {f(r['size_ratio'], '.3f')} | "
              f"{f(r['task_value'], '.4f')} | {f(r['cosine'], '.5f')} | {r['fidelity_by'] or '-'} | "
              f"{f(r['fp32_ms'], '.2f')} → {f(r['int8_ms'], '.2f')} | {f(r['latency_ratio'], '.2f')} | "
              f"{f(r['convert_s'], '.1f')} | {f(r['peak_rss_mb'], '.0f')} |")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smaller MobileNet, fewer timing runs")
    ap.add_argument("--only", choices=["onnx", "mobile"], help="one of the two tables")
    ap.add_argument("--real", nargs="*", metavar="NAME", help="the real-model table (all zoo models, or NAMEs)")
    args = ap.parse_args()
    if args.real is not None:
        from bench import real_models

        rows = real_models.run(args.real or real_models.zoo_names(), list(real_models.DEFAULT_TARGETS), 240.0)
        real_models.print_table(rows)
        return 0
    runs = 15 if args.quick else 50
    rows: list[dict] = []
    mobile: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="ef-bench-") as tmp:
        work = Path(tmp)
        if args.only != "onnx":
            mobile = mobile_rows(work, args.quick, runs)
        for name, model, data in (models(work, args.quick) if args.only != "mobile" else []):
            cal, ev = split(data, 0.3)
            rows.append(plain_row(name, model, cal, ev, work, runs))
            source = load_source(model, work / f"{model.stem}-work")
            conv = Converter(source, cal, ev, work / f"{model.stem}-work", ConvertOptions(latency_runs=runs))
            for pid in PROFILES:
                t0 = time.perf_counter()
                r = next(r for r in conv.convert(load_profile(pid), work / "out") if r.format == "onnx-int8")
                metric, value = task_metric(r.fidelity)
                if r.latency is None and r.status.value == "refused":
                    lat = (None, None, None)
                else:
                    lat = (r.latency.fp32_ms, r.latency.int8_ms, r.latency.ratio)
                rows.append(dict(model=name, pipeline=f"edgefleet {pid}", status=r.status.value,
                                 fp32_bytes=r.size.fp32_bytes, int8_bytes=r.size.int8_bytes,
                                 size_ratio=r.size.ratio, metric=metric, task_value=value,
                                 cosine=min(f.cosine for f in r.fidelity), fp32_ms=lat[0], int8_ms=lat[1],
                                 latency_ratio=lat[2],
                                 float_nodes=len(r.mixed_precision.float_nodes) if r.mixed_precision else 0,
                                 convert_s=time.perf_counter() - t0))
            print(f"  done: {name}", file=sys.stderr, flush=True)

    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    if rows:
        print("| model | pipeline | status | FP32 → INT8 size | ratio | task metric | value | cosine | "
              "latency FP32 → INT8 (ms) | ratio | float nodes |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['pipeline']} | {r['status']} | {r['fp32_bytes'] / 1e6:.2f} → "
              f"{r['int8_bytes'] / 1e6:.2f} MB | {r['size_ratio']:.3f} | {r['metric']} | {f(r['task_value'], '.4f')} | "
              f"{r['cosine']:.5f} | {f(r['fp32_ms'], '.2f')} → {f(r['int8_ms'], '.2f')} | "
              f"{f(r['latency_ratio'], '.2f')} | {r['float_nodes']} |")
    if mobile:
        print_mobile(mobile)
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / "convert_bench.json").write_text(json.dumps({"quick": args.quick, "rows": rows, "mobile": mobile},
                                                           indent=2))
    print(f"\nJSON: {results / 'convert_bench.json'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
