"""`make demo`: the converter's main job on embedded defaults.

Trains a small CNN on scikit-learn's real handwritten digits, exports it to ONNX, and converts it for every built-in
hardware profile with `fleet-convert`, calibrating on real digits. Prints the summary and where the reports are.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.zoo import digits_data, trained_digits_classifier  # noqa: E402


def main() -> int:
    out = ROOT / "demo-out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    print("training a digits classifier on scikit-learn's 1,797 real handwritten digits ...")
    model, accuracy = trained_digits_classifier(out / "digits.onnx")
    print(f"  FP32 test accuracy {accuracy:.2%}; model {model.stat().st_size / 1e3:.1f} kB")
    _, _, x_test, _ = digits_data()
    np.savez(out / "calib.npz", image=x_test)  # held-out digits: calibration + evaluation split
    cmd = [str(Path(sys.executable).with_name("fleet-convert")), "convert", str(model), "--all-profiles",
           "--calib", str(out / "calib.npz"), "-o", str(out / "artifacts")]
    print("$ " + " ".join(cmd[0:1] + [c.replace(str(ROOT) + "/", "") for c in cmd[1:]]), flush=True)
    code = subprocess.call(cmd, env={"COLUMNS": "150", **__import__("os").environ})
    print(f"\nfleet-convert exited {code}; reports: {out / 'artifacts'}/<profile>/*.report.json")
    # 4 means the gate refused an artifact (e.g. INT8 slower than FP32 on a profile whose policy refuses that):
    # the gate doing its job, not a failed demo.
    return 0 if code in (0, 4) else code


if __name__ == "__main__":
    sys.exit(main())
