"""`make demo-convert`: the converter on its own (the fleet demo, `make demo`, converts through the server).

Trains a small CNN on scikit-learn's real handwritten digits, exports it to ONNX, and converts it for every built-in
hardware profile with `fleet-convert`, calibrating on real digits. Then builds a signed mobile app bundle (Core ML +
TFLite) and verifies it. Prints the summaries and where the reports are.
"""

from __future__ import annotations

import os
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
    (out / "labels.txt").write_text("".join(f"digit {d}\n" for d in range(10)))
    code = run("convert", model, "--all-profiles", "--calib", out / "calib.npz", "-o", out / "artifacts")
    print(f"\nfleet-convert exited {code}; reports: {out / 'artifacts'}/<profile>/*.report.json")
    # 4 means the gate refused an artifact (e.g. INT8 slower than FP32 on a profile whose policy refuses that):
    # the gate doing its job, not a failed demo.
    if code not in (0, 4):
        return code
    steps = [("keygen", "-o", out / "keys"),
             ("bundle", model, "--calib", out / "calib.npz", "--labels", out / "labels.txt", "--signing-key",
              out / "keys" / "fleet-signing.pem", "--name", "digits", "-o", out / "digits-app-bundle.zip"),
             ("verify-bundle", out / "digits-app-bundle.zip", "--public-key", out / "keys" / "fleet-signing.pub.pem")]
    for args in steps:
        print()
        code = run(*args)
        if code != 0:
            return code
    return 0


def run(*args) -> int:
    cmd = [str(Path(sys.executable).with_name("fleet-convert")), *map(str, args)]
    print("$ " + " ".join(["fleet-convert"] + [c.replace(str(ROOT) + "/", "") for c in cmd[1:]]), flush=True)
    return subprocess.call(cmd, env={"COLUMNS": "150", **os.environ})


if __name__ == "__main__":
    sys.exit(main())
