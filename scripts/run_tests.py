"""`make test`: the suite as two pytest processes side by side, sharing the machine's cores.

One lane runs the converters' tests, which keep the cores busy with ONNX Runtime, TensorFlow and Core ML; the other
runs everything else, which mostly waits on subprocesses (servers, agents, brokers, PostgreSQL, a browser). On one
process the two add up (54 min on two cores); side by side the longer lane sets the time. Two processes rather than
pytest-xdist: xdist 3.8's test groups do not work with pytest 9 (it renames a node attribute pytest no longer reads),
and some server tests count every sandbox process on the machine, so all of them must stay in one process.

The second lane streams to the terminal; the converters' lane is written to a log and printed when it ends. Extra
arguments go to both lanes (e.g. ``-k rollout``); the exit status is non-zero when either lane fails.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CPU_LANE = ["tests/converters"]
NO_TESTS = 5  # pytest: nothing collected (e.g. a -k that matches only the other lane)


def main(argv: list[str]) -> int:
    log = ROOT / ".pytest-converters.log"
    base = [sys.executable, "-m", "pytest", "--durations=15"]
    t0 = time.monotonic()
    with open(log, "wb") as out:
        cpu = subprocess.Popen([*base, *CPU_LANE, *argv], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        try:
            rest = subprocess.call([*base, *(f"--ignore={p}" for p in CPU_LANE), *argv], cwd=ROOT)
            print(f"\n=== other lane finished after {time.monotonic() - t0:.0f} s; waiting for the converters' lane "
                  f"({log.name}) ===", flush=True)
            cpu_rc = cpu.wait()
        except KeyboardInterrupt:
            cpu.send_signal(signal.SIGINT)
            cpu.wait(60)
            raise
    print(f"\n=== converters' lane ({time.monotonic() - t0:.0f} s) ===", flush=True)
    sys.stdout.write(log.read_text(errors="replace"))
    rcs = [rc for rc in (rest, cpu_rc) if rc != NO_TESTS] or [0]
    failed = max(rcs)
    print(f"\n=== two lanes: other {'passed' if rest in (0, NO_TESTS) else f'FAILED ({rest})'}, converters "
          f"{'passed' if cpu_rc in (0, NO_TESTS) else f'FAILED ({cpu_rc})'}; {time.monotonic() - t0:.0f} s ===")
    return failed


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
