"""The real-model table: published models from PyPI wheels (tests/realzoo), FP32 vs ONNX Runtime's plain
`quantize_static` vs edgefleet, per target, scored against ground truth by each model's own post-processing.

Each edgefleet conversion runs in its own child process (`python bench/real_models.py --child ...`), so the peak
memory it reports (VmHWM) is that conversion's alone. Accuracy is then measured here, independently of the converter's
gate: the shipped artifact runs under ONNX Runtime (or LiteRT) and the zoo's scorer reads its outputs.

    python bench/real_models.py [NAME ...] [--targets rpi4:onnx-int8,...] [--search-seconds S]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DEFAULT_TARGETS = ("rpi4:onnx-int8", "jetson-orin-nano:onnx-int8", "android-arm64:tflite-int8",
                   "ios-a15:coreml-int8")
# The zoo scorers' figures, most telling first: a model's row shows the first one its scorer reports.
HEADLINES = ("map50", "f1", "line_accuracy", "line_acc", "accuracy", "top1", "pitch_accuracy", "retrieval_top1")
CHILD_TIMEOUT_S = 1800


def child(name: str, profile: str, fmt: str, out: Path, search_seconds: float) -> int:
    """Convert one zoo model for one profile's format, write the report beside the artifact."""
    from converters.calibration import load_dataset
    from converters.pipeline import Converter, ConvertOptions
    from converters.source import load_source
    from converters.tasks import OutputKind
    from converters.truth import load_truth
    from firmware_profiles import ArtifactFormat, load_profile
    from tests import realzoo

    p = realzoo.prepare(name)
    work = out / "work"
    source = load_source(p.model, work)
    cal, ev = load_dataset(p.calibration, source.inputs), load_dataset(p.evaluation, source.inputs)
    truth = load_truth(p.truth_path)
    if truth.kind is OutputKind.REGRESSION:  # the FP32 embeddings themselves: nothing to gate beyond FP32
        truth = None
    t0 = time.perf_counter()
    conv = Converter(source, cal, ev, work, ConvertOptions(latency_runs=20, search_seconds=search_seconds),
                     truth=truth)
    report = conv.convert(load_profile(profile), out / "out", formats={ArtifactFormat(fmt)})[0]
    doc = report.model_dump(mode="json")
    doc["bench_seconds"] = time.perf_counter() - t0
    (out / "report.json").write_text(json.dumps(doc))
    return 0


def split_calls(stacked: dict[str, np.ndarray], calls: int) -> list[dict[str, np.ndarray]]:
    return [{k: v.reshape(calls, v.shape[0] // calls, *v.shape[1:])[i] for k, v in stacked.items()}
            for i in range(calls)]


def score_onnx(p, path: Path) -> dict[str, float]:
    from converters import runtime

    samples = p.evaluation_samples()
    return p.score(split_calls(runtime.run_all(runtime.session(path), samples), len(samples)))


def score_tflite(p, path: Path, fp32: Path, report: dict) -> dict[str, float]:
    from converters import runtime
    from converters.tflite_int8 import NCHW_TO_NHWC, LiteRTModel

    samples = p.evaluation_samples()
    reference = runtime.run_all(runtime.session(fp32), samples)
    layouts = (report.get("tflite") or {}).get("input_layouts", {})
    perms = {n: NCHW_TO_NHWC if "NHWC" in v else None for n, v in layouts.items()}
    got = LiteRTModel(path, perms).run_all(samples, reference)
    return p.score(split_calls(got, len(samples)))


def plain(p, fp32: Path, work: Path) -> tuple[dict[str, float], float]:
    from tests.realzoo.baseline import quantize

    out = quantize(fp32, work / f"{p.name}.plain.onnx", p, None)
    return score_onnx(p, out), out.stat().st_size / fp32.stat().st_size


def headline(scores: dict[str, float]) -> tuple[str, float]:
    """The task figure of a zoo scorer's result (mAP for detectors, line accuracy for recognizers...)."""
    key = next((k for k in HEADLINES if k in scores), next(iter(scores)))
    return key, scores[key]


def zoo_names() -> list[str]:
    from tests import realzoo

    return realzoo.names()


def run(names: list[str], targets: list[str], search_seconds: float, checkpoint: Path | None = None) -> list[dict]:
    from converters.source import load_source
    from tests import realzoo

    rows = []
    with tempfile.TemporaryDirectory(prefix="ef-real-") as tmp:
        work = Path(tmp)
        for name in names:
            p = realzoo.prepare(name)
            fp32 = load_source(p.model, work / name / "src").path
            metric, fp32_value = headline(score_onnx(p, fp32))
            plain_scores, plain_ratio = plain(p, fp32, work / name)
            row = dict(model=name, metric=metric, fp32=fp32_value, plain=plain_scores[metric],
                       plain_size_ratio=plain_ratio, targets=[])
            for target in targets:
                profile, fmt = target.split(":")
                out = work / name / target.replace(":", "-")
                out.mkdir(parents=True)
                t0 = time.perf_counter()
                proc = subprocess.run([sys.executable, __file__, "--child", name, profile, fmt, str(out),
                                       str(search_seconds)], capture_output=True, text=True,
                                      timeout=CHILD_TIMEOUT_S, check=False)
                seconds = time.perf_counter() - t0
                entry = dict(target=target, seconds=seconds)
                if proc.returncode != 0 or not (out / "report.json").exists():
                    entry.update(status="error", reason=(proc.stderr.strip().splitlines() or ["?"])[-1][:200])
                    row["targets"].append(entry)
                    continue
                r = json.loads((out / "report.json").read_text())
                entry.update(status=r["status"], reason="; ".join(r["reasons"])[:240],
                             size_ratio=(r.get("size") or {}).get("ratio"),
                             latency_ratio=(r.get("latency") or {}).get("ratio"), peak_rss_mb=r.get("peak_rss_mb"),
                             float_nodes=len((r.get("mixed_precision") or {}).get("float_nodes", [])),
                             sixteen_bit_nodes=len((r.get("mixed_precision") or {}).get("sixteen_bit_nodes", [])),
                             smoothing=(r.get("quantization") or {}).get("smoothing"),
                             choice=(r.get("search") or {}).get("choice"))
                if r.get("tflite"):
                    entry["peak_rss_mb"] = max(entry["peak_rss_mb"] or 0, r["tflite"]["conversion_peak_rss_mb"])
                if r["artifact"] and fmt.startswith("coreml"):
                    # Core ML predicts only on macOS: the report's figure against ground truth comes from the host
                    # simulation of its 8-bit weights (coremltools' own quantization, run in PyTorch).
                    truth = [o["truth"] for o in r["fidelity"] if o.get("truth")]
                    entry["ours"] = truth[0]["candidate"] if truth else None
                    entry["ours_by"] = "host simulation, converter's metric" + (f" ({truth[0]['metric']})"
                                                                                if truth else "")
                elif r["artifact"]:
                    artifact = out / "out" / profile / r["artifact"]
                    scores = score_tflite(p, artifact, fp32, r) if fmt.startswith("tflite") else \
                        score_onnx(p, artifact)
                    entry["ours"] = scores[metric]
                row["targets"].append(entry)
                print(f"  {name} {target}: {entry['status']} in {seconds:.0f} s", file=sys.stderr, flush=True)
            rows.append(row)
            if checkpoint is not None:  # a long run keeps what it measured so far
                checkpoint.write_text(json.dumps(rows, indent=2))
    return rows


def print_table(rows: list[dict]) -> None:
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    print("| model | metric (vs ground truth) | FP32 | plain quantize_static (size) | target | edgefleet | size "
          "| latency INT8/FP32 | float nodes | convert (s) | peak RSS (MB) | status |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        for t in r["targets"]:
            status = t["status"] + (f": {t['reason']}" if t["status"] != "shippable" and t.get("reason") else "")
            print(f"| {r['model']} | {r['metric']} | {r['fp32']:.3f} | {r['plain']:.3f} ({r['plain_size_ratio']:.2f}×) "
                  f"| {t['target']} | {f(t.get('ours'), '.3f')} | {f(t.get('size_ratio'), '.3f')} | "
                  f"{f(t.get('latency_ratio'), '.2f')} | {t.get('float_nodes', '-')} | {t['seconds']:.0f} | "
                  f"{f(t.get('peak_rss_mb'), '.0f')} | {status} |")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("names", nargs="*")
    ap.add_argument("--targets", default=",".join(DEFAULT_TARGETS))
    ap.add_argument("--search-seconds", type=float, default=240.0)
    ap.add_argument("--child", nargs=5, metavar=("NAME", "PROFILE", "FORMAT", "OUT", "SEARCH_S"))
    args = ap.parse_args()
    if args.child:
        name, profile, fmt, out, search = args.child
        return child(name, profile, fmt, Path(out), float(search))
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    rows = run(args.names or zoo_names(), args.targets.split(","), args.search_seconds,
               checkpoint=results / "real_models.json")
    print_table(rows)
    print(f"\nJSON: {results / 'real_models.json'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
