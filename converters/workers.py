"""Conversion workers: TensorFlow/onnx2tf and coremltools/torch run in child processes (``python -m MODULE JOB``),
out of the converter's own process (their import time, memory and threads; a crash stays in the child). The
child's own peak RSS is the per-target memory figure in reports and benchmarks.

Protocol: the parent writes ``JOB`` (JSON with an ``out`` folder); the child writes ``out/result.json`` with
``ok`` and either its results or ``error``; no result file means the child died (a signal, an abort).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from converters.errors import QuantizationError

NOISE = ("I0000", "W0000", "WARNING: All log", "E0000")


def peak_rss_mb() -> float:
    """This process's own peak RSS. Not ``ru_maxrss``: Linux carries that across exec, so a worker started by a
    big parent would report the parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_worker(module: str, job: dict, out: Path, *, what: str, timeout_s: int) -> tuple[dict, float]:
    """Run ``module`` on ``job`` in a child process; its result and the wall time. Failures → QuantizationError."""
    (out / "job.json").write_text(json.dumps(job))
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", module, str(out / "job.json")], capture_output=True, text=True,
                              timeout=timeout_s, cwd=str(Path(__file__).resolve().parent.parent))
    except subprocess.TimeoutExpired as e:
        raise QuantizationError(f"{what} did not finish in {timeout_s} s") from e
    seconds = time.perf_counter() - t0
    result_file = out / "result.json"
    if not result_file.exists():
        how = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit {proc.returncode}"
        tail = [ln for ln in (proc.stderr or "").strip().splitlines() if ln.strip() and not ln.startswith(NOISE)][-2:]
        raise QuantizationError(f"{what} crashed ({how})" + (f": {' | '.join(tail)[:300]}" if tail else ""))
    result = json.loads(result_file.read_text())
    if not result["ok"]:
        raise QuantizationError(f"{what} failed: {result['error']}")
    return result, seconds


def worker_main(run: Callable[[dict], dict]) -> int:
    """The child's side: read the job, run it, always leave a result file (unless the process itself dies)."""
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "-1")
    job = json.loads(Path(sys.argv[1]).read_text())
    try:
        result = {"ok": True, **run(job)}
    except Exception as e:
        result = {"ok": False, "error": f"{type(e).__name__}: {str(e).strip().splitlines()[0][:500]}",
                  "traceback": traceback.format_exc()[-4000:]}
    result["peak_rss_mb"] = peak_rss_mb()
    (Path(job["out"]) / "result.json").write_text(json.dumps(result))
    return 0 if result["ok"] else 1
