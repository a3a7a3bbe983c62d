"""Agent benchmark: local-API overhead over the raw runtime call, agent RSS, and update apply time delta vs full.

In one run, on loopback, with a real agent process (``fleet-agent run``) and a real Mosquitto:
  1. a small and a mid-size model: raw ONNX Runtime ``run`` in this process vs the agent's ``/v1/predict`` with a
     binary (.npy) and a JSON body over one keep-alive connection — p50/p99 and the p50 overhead;
  2. the agent's RSS with no model, then with each model loaded (the second beside the first: two named models
     served at once, and the small model's requests measured again beside the mid-size one);
  3. an update of the mid-size model (head retrained) as a bsdiff4 delta vs the full file: wall time from offer to
     committed result, bytes moved, and the agent's own step timings — while a client keeps requesting the small
     model (its requests during the updates: count, failures, p50/p99).
Prints Markdown tables and writes bench/results/agent_bench.json. Usage: python bench/agent_bench.py [--quick]
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import io
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.slots import SlotStore  # noqa: E402
from fleet_runtime import runtimes  # noqa: E402
from tests import zoo  # noqa: E402
from tests.fleet_driver import AgentProcess, Broker, FleetDriver, Release, agent_config, free_port, golden  # noqa: E402


def percentiles(samples: list[float]) -> tuple[float, float]:
    a = np.asarray(samples) * 1e3
    return float(np.percentile(a, 50)), float(np.percentile(a, 99))


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def retrained_head(src: Path, dst: Path, seed: int = 1) -> Path:
    """The same network with its classifier head's weights changed (a typical fine-tune)."""
    m = onnx.load(str(src))
    last = [n for n in m.graph.node if n.op_type == "Gemm"][-1]
    names = set(last.input[1:])
    rng = np.random.default_rng(seed)
    for init in m.graph.initializer:
        if init.name in names:
            w = numpy_helper.to_array(init)
            init.CopyFrom(numpy_helper.from_array((w + rng.normal(0, 0.01, w.shape)).astype(w.dtype), init.name))
    onnx.save(m, str(dst))
    return dst


def time_api(port: int, name: str, x: np.ndarray, runs: int, path: str) -> dict[str, tuple[float, float]]:
    buf = io.BytesIO()
    np.save(buf, x)
    bodies = {"binary (.npy)": (buf.getvalue(), "application/x-npy"),
              "JSON": (json.dumps({"inputs": {name: {"data": x.ravel().tolist(), "shape": list(x.shape)}}}).encode(),
                       "application/json")}
    out = {}
    for label, (body, ctype) in bodies.items():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        times = []
        for i in range(runs + 20):
            t0 = time.perf_counter()
            conn.request("POST", path, body=body, headers={"Content-Type": ctype})
            r = conn.getresponse()
            r.read()
            if r.status != 200:
                raise RuntimeError(f"predict answered {r.status}")
            if i >= 20:
                times.append(time.perf_counter() - t0)
        conn.close()
        out[label] = percentiles(times)
    return out


def time_socket(port: int, x: np.ndarray, runs: int, path: str) -> tuple[float, float]:
    """The binary request from a lean keep-alive client (raw socket, as a C or Go client would be): what the agent
    adds, without Python's http.client parsing its answer through the email package."""
    import socket

    buf = io.BytesIO()
    np.save(buf, x)
    body = buf.getvalue()
    req = (f"POST {path} HTTP/1.1\r\nHost: agent\r\nContent-Type: application/x-npy\r\n"
           f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    times = []
    for i in range(runs + 20):
        t0 = time.perf_counter()
        s.sendall(req)
        data = b""
        while b"\r\n\r\n" not in data:
            data += s.recv(1 << 16)
        head, rest = data.split(b"\r\n\r\n", 1)
        length = next(int(h.split(b":")[1]) for h in head.split(b"\r\n") if h.lower().startswith(b"content-length"))
        while len(rest) < length:
            rest += s.recv(1 << 16)
        if i >= 20:
            times.append(time.perf_counter() - t0)
    s.close()
    return percentiles(times)


def keep_requesting(port: int, path: str, x: np.ndarray, stop: threading.Event, out: list) -> None:
    """One keep-alive client's requests until ``stop`` (bounded: ten minutes at most): (status, seconds) each."""
    buf = io.BytesIO()
    np.save(buf, x)
    body = buf.getvalue()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    deadline = time.monotonic() + 600
    while not stop.is_set() and time.monotonic() < deadline:
        t0 = time.perf_counter()
        try:
            conn.request("POST", path, body=body, headers={"Content-Type": "application/x-npy"})
            r = conn.getresponse()
            r.read()
            out.append((r.status, time.perf_counter() - t0))
        except OSError:
            out.append((0, time.perf_counter() - t0))
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.close()


def time_raw(model_path: Path, x: np.ndarray, runs: int) -> tuple[float, float]:
    m = runtimes.load(model_path)
    name = m.inputs[0].name
    times = []
    for i in range(runs + 20):
        t0 = time.perf_counter()
        m.run({name: x})
        if i >= 20:
            times.append(time.perf_counter() - t0)
    return percentiles(times)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    runs = 200 if args.quick else 1000
    results: dict = {"runs": runs, "latency": [], "rss": {}, "updates": []}
    with tempfile.TemporaryDirectory(prefix="ef-agent-bench-") as tmp:
        work = Path(tmp)
        small = zoo.mlp_opset(work / "small.onnx", opset=13)
        mid = zoo.mobilenet_like(work / "mid.onnx", size=96 if args.quick else 128, width=32, blocks=3)
        size = 96 if args.quick else 128
        models = {"small": ("small (conv net, 16 px, 6 k params)", small, np.zeros((1, 3, 16, 16), np.float32)),
                  "mid": (f"mid (MobileNet-like, {size} px)", mid,
                          np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32))}
        broker = Broker(work / "broker").start()
        try:
            driver = FleetDriver(broker.url, "bench-dev", chunk_size=64 * 1024)
            port = free_port()
            cfg = agent_config(work / "agent.toml", device_id="bench-dev", broker_url=broker.url, root=driver.root,
                               state_dir=work / "state", port=port, telemetry_interval_s=60.0)
            agent = AgentProcess(cfg, port, driver=driver).start()
            time.sleep(2.0)
            results["rss"]["no model"] = rss_mb(agent.proc.pid)
            served: list[str] = []
            for name, (label, path, _) in models.items():  # one after the other: the second beside the first
                agent.stop()
                slots = SlotStore(work / "state" / "models" / name)
                data = path.read_bytes()
                info = slots.stage(path, sha256=hashlib.sha256(data).hexdigest(), fmt="onnx-int8", model=name,
                                   model_version="1", job="bench")
                slots.switch_to(info.slot)
                agent.start(wait_ready=True)
                served.append(name)
                measured = [name] if len(served) == 1 else [name, served[0]]
                for which in measured:
                    which_label, which_path, which_x = models[which]
                    route = f"/v1/models/{which}/predict"
                    raw = time_raw(which_path, which_x, runs)
                    api = time_api(port, "x" if which_path == small else "input", which_x, runs, route)
                    api["binary, lean client"] = time_socket(port, which_x, runs, route)
                    beside = f", beside {', '.join(n for n in served if n != which)}" if len(served) > 1 else ""
                    results["latency"].append({"model": which_label + beside, "raw": raw, **api})
                results["rss"][" + ".join(served)] = rss_mb(agent.proc.pid)
                print(f"  done: {label}", file=sys.stderr, flush=True)

            # updates of "mid": v1 over MQTT, then v2 (head retrained) as a delta and again as the full file, while a
            # client keeps requesting "small" (one model's update must not touch another's requests)
            mid_x = models["mid"][2]
            v1 = Release("mid", "1", mid.read_bytes(), golden(mid, {"input": mid_x}))
            mid2 = retrained_head(mid, work / "mid2.onnx")
            v2 = Release("mid", "2", mid2.read_bytes(), golden(mid2, {"input": mid_x}))
            stop, beside = threading.Event(), []
            load = threading.Thread(target=keep_requesting, args=(port, "/v1/models/small/predict",
                                                                  models["small"][2], stop, beside))
            load.start()
            try:
                for kind in ("full", "delta"):
                    for job, release, base in ((f"{kind}-v1", v1, None), (f"{kind}-v2", v2, v1 if kind == "delta"
                                                                          else None)):
                        before = len(driver.chunk_requests)
                        offer = driver.offer(job, release, base=base, min_cosine=0.99, send=False)  # signs, diffs
                        t0 = time.perf_counter()
                        driver.client.publish(f"ef/v1/d/{driver.device_id}/cmd", offer.to_bytes(), qos=1)
                        result = driver.wait_result(job, timeout=300)
                        wall = time.perf_counter() - t0
                        if result.result != "ok":
                            raise RuntimeError(f"{job}: {result}")
                        if job.endswith("v2"):
                            reqs = [r for r in driver.chunk_requests[before:] if r.job == job]
                            results["updates"].append({"payload": kind, "wall_ms": wall * 1e3,
                                                       "chunks": sum(len(r.indices) for r in reqs),
                                                       "bytes": len(driver.files[(job, reqs[0].path)]),
                                                       "timings_ms": result.timings_ms,
                                                       "model_bytes": len(release.data)})
            finally:
                stop.set()
                load.join(60)
            ok = [t for status, t in beside if status == 200]
            p50, p99 = percentiles(ok) if ok else (float("nan"), float("nan"))
            results["beside_update"] = {"requests": len(beside), "failed": len(beside) - len(ok), "p50_ms": p50,
                                        "p99_ms": p99}
            agent.stop()
            driver.close()
        finally:
            broker.stop()

    print(f"| model | raw ORT run p50 / p99 (ms) | API binary, lean client | API binary, http.client | "
          f"API JSON, http.client | overhead p50: lean / http.client / JSON |  ({runs} runs each)")
    print("|---|---|---|---|---|---|")
    for row in results["latency"]:
        raw, lean, b, j = row["raw"], row["binary, lean client"], row["binary (.npy)"], row["JSON"]
        print(f"| {row['model']} | {raw[0]:.3f} / {raw[1]:.3f} | {lean[0]:.3f} / {lean[1]:.3f} | "
              f"{b[0]:.3f} / {b[1]:.3f} | {j[0]:.3f} / {j[1]:.3f} | {lean[0] - raw[0]:+.3f} / "
              f"{b[0] - raw[0]:+.3f} / {j[0] - raw[0]:+.3f} ms |")
    print("\n| agent RSS, models served | MB |\n|---|---|")
    for k, v in results["rss"].items():
        print(f"| {k} | {v:.1f} |")
    b = results["beside_update"]
    print(f"\n| requests to `small` during the four updates of `mid` | failed | p50 / p99 (ms) |\n|---|---|---|\n"
          f"| {b['requests']} | {b['failed']} | {b['p50_ms']:.3f} / {b['p99_ms']:.3f} |")
    print("\n| update (mid model, head retrained) | moved | wall, offer → committed (ms) | download | stage | probe |"
          " switch |")
    print("|---|---|---|---|---|---|---|")
    for u in results["updates"]:
        t = u["timings_ms"]
        print(f"| {u['payload']} | {u['bytes'] / 1e3:.1f} kB of {u['model_bytes'] / 1e6:.2f} MB | {u['wall_ms']:.0f} | "
              f"{t.get('download_ms', 0):.0f} | {t.get('stage_ms', 0):.0f} | {t.get('probe_ms', 0):.0f} | "
              f"{t.get('switch_ms', 0):.0f} |")
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "agent_bench.json").write_text(json.dumps(results, indent=2))
    print(f"\nJSON: {out / 'agent_bench.json'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
