"""Delta benchmark: patch size / full size, encode and apply time, peak memory — every algorithm, one run.

ONNX models built here (≈1 MB to ≈100 MB) and their INT8 versions; updates: identical, retrained final layer only,
all weights fine-tuned, different architecture. Prints a Markdown table and writes bench/results/delta_bench.json.
Usage: python bench/delta_bench.py [--quick]   (--quick skips the 100 MB model)
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
import onnx
import torch
from onnx import numpy_helper
from onnxruntime.quantization import CalibrationDataReader, quantize_static

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fleet_protocol import delta  # noqa: E402
from tests import zoo  # noqa: E402

ALGS = ("bsdiff4", "zstd-patch", "full-zstd", "onnx-tensors")


def mlp(path: Path, width: int, *, layers: int = 4, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    mods: list[torch.nn.Module] = []
    for _ in range(layers):
        mods += [torch.nn.Linear(width, width), torch.nn.ReLU()]
    net = torch.nn.Sequential(*mods, torch.nn.Linear(width, 10))
    return zoo.export(net, (torch.randn(1, width),), path, input_names=["x"], output_names=["logits"])


def modified(src: Path, dst: Path, which: str, seed: int = 1) -> Path:
    """Retrain the head (the last Gemm/MatMul's weights) or fine-tune every float weight by ~1%."""
    m = onnx.load(str(src))
    last = [n for n in m.graph.node if n.op_type in ("Gemm", "MatMul")][-1]
    rng = np.random.default_rng(seed)
    for init in m.graph.initializer:
        if which == "all" or init.name in last.input:
            a = numpy_helper.to_array(init)
            if a.dtype == np.float32:
                init.CopyFrom(numpy_helper.from_array((a + rng.normal(0, 0.01 * (a.std() + 1e-3), a.shape))
                                                      .astype(np.float32), init.name))
    onnx.save(m, str(dst))
    return dst


class Reader(CalibrationDataReader):
    def __init__(self, model: Path, n: int = 8):
        inp = onnx.load(str(model), load_external_data=False).graph.input[0]
        shape = [d.dim_value or 1 for d in inp.type.tensor_type.shape.dim]
        rng = np.random.default_rng(0)
        self.items = iter([{inp.name: rng.standard_normal(shape).astype(np.float32)} for _ in range(n)])

    def get_next(self):
        return next(self.items, None)


def int8(src: Path) -> Path:
    out = src.with_name(src.stem + ".int8.onnx")
    quantize_static(str(src), str(out), Reader(src), per_channel=True)
    return out


def encode_one(alg: str, base: bytes, target: bytes) -> bytes:
    return delta.encode_as("full" if alg == "full-zstd" else alg, base, target)


PEAK = """
import sys
sys.path.insert(0, {root!r})
from pathlib import Path
from bench.delta_bench import encode_one
from fleet_protocol import delta

def status(key):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key)) / 1024

base, target = Path({base!r}).read_bytes(), Path({target!r}).read_bytes()
patch = Path({patch!r}).read_bytes()
open("/proc/self/clear_refs", "w").write("5")  # reset the peak-RSS high-water mark (Linux >= 4.0)
before = status("VmRSS:")
if {op!r} == "encode":
    encode_one({alg!r}, base, target)
else:
    delta.apply(base, patch)
print(status("VmHWM:") - before)
"""


def peak_mb(op: str, alg: str, base: Path, target: Path, patch: Path) -> float:
    """Peak memory the operation adds on top of holding base, target and patch, measured in a fresh process so
    that C allocations (zstd match tables, bsdiff4 suffix arrays) count."""
    code = PEAK.format(root=str(ROOT), base=str(base), target=str(target), patch=str(patch), op=op, alg=alg)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    options = delta.EncodeOptions()
    budgets = {"bsdiff4": options.bsdiff_max_bytes, "zstd-patch": options.zstd_patch_max_bytes}
    rows = []
    with tempfile.TemporaryDirectory(prefix="ef-delta-") as tmp:
        w = Path(tmp)
        models = [("MobileNet-like 1 MB", zoo.mobilenet_like(w / "mb.onnx", width=32, blocks=3),
                   zoo.mobilenet_like(w / "mb-other.onnx", width=32, blocks=3, grouped_downsample=True,
                                      seed=5)),
                  ("MobileNet-like 16 MB", zoo.mobilenet_like(w / "mb16.onnx", width=64, blocks=4),
                   zoo.mobilenet_like(w / "mb16-other.onnx", width=56, blocks=4, seed=5))]
        if not args.quick:
            models.append(("MLP 100 MB", mlp(w / "mlp.onnx", 2560), mlp(w / "mlp-other.onnx", 2432, seed=5)))
        for name, base_path, other_path in models:
            variants = {"identical": base_path, "retrained head": modified(base_path, w / f"{base_path.stem}-h.onnx",
                                                                           "head"),
                        "all fine-tuned": modified(base_path, w / f"{base_path.stem}-a.onnx", "all"),
                        "other architecture": other_path}
            for precision in ("FP32", "INT8"):
                base = base_path if precision == "FP32" else int8(base_path)
                base_bytes = base.read_bytes()
                for update, target_path in variants.items():
                    target = target_path if precision == "FP32" else (
                        base if update == "identical" else int8(target_path))
                    target_bytes = target.read_bytes()
                    for alg in ALGS:
                        budget = budgets.get(alg)
                        if budget is not None and max(len(base_bytes), len(target_bytes)) > budget:
                            rows.append(dict(model=name, precision=precision, update=update, algorithm=alg,
                                             full_bytes=len(target_bytes), patch_bytes=None, ratio=None,
                                             encode_s=None, apply_s=None,
                                             note=f"not tried: over its {budget >> 20} MB encode budget"))
                            continue
                        t0 = time.perf_counter()
                        try:
                            patch = encode_one(alg, base_bytes, target_bytes)
                        except ValueError as e:
                            rows.append(dict(model=name, precision=precision, update=update, algorithm=alg,
                                             full_bytes=len(target_bytes), patch_bytes=None, ratio=None,
                                             encode_s=None, apply_s=None, note=str(e)))
                            continue
                        enc = time.perf_counter() - t0
                        t0 = time.perf_counter()
                        assert delta.apply(base_bytes, patch) == target_bytes
                        app = time.perf_counter() - t0
                        row = dict(model=name, precision=precision, update=update, algorithm=alg,
                                   full_bytes=len(target_bytes), patch_bytes=len(patch),
                                   ratio=len(patch) / len(target_bytes), encode_s=enc, apply_s=app, note="")
                        if name.startswith("MLP") and precision == "FP32" and update in ("retrained head",
                                                                                       "all fine-tuned"):
                            pfile = w / "patch.bin"
                            pfile.write_bytes(patch)
                            row["encode_peak_mb"] = peak_mb("encode", alg, base, target, pfile)
                            row["apply_peak_mb"] = peak_mb("apply", alg, base, target, pfile)
                        rows.append(row)
                    print(f"  done: {name} {precision} {update}", file=sys.stderr, flush=True)
    print("| model | precision | update | algorithm | patch / full | patch size | encode s | apply s | "
          "peak MB enc / apply |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["patch_bytes"] is None:
            print(f"| {r['model']} | {r['precision']} | {r['update']} | {r['algorithm']} | - | - | - | - | "
                  f"{r['note']} |")
            continue
        peak = f"{r['encode_peak_mb']:.0f} / {r['apply_peak_mb']:.0f}" if "encode_peak_mb" in r else "-"
        size = f"{r['patch_bytes'] / 1e6:.3f} MB" if r["patch_bytes"] >= 1e5 else f"{r['patch_bytes'] / 1e3:.1f} kB"
        print(f"| {r['model']} | {r['precision']} | {r['update']} | {r['algorithm']} | {r['ratio']:.4f} | {size} | "
              f"{r['encode_s']:.2f} | {r['apply_s']:.2f} | {peak} |")
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / "delta_bench.json").write_text(json.dumps({"quick": args.quick, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
