"""`make demo`: the whole journey on one machine, on loopback, secured, with nothing left running afterwards.

1. A fleet CA, the fleet's signing keys, Mosquitto configured by the server (no anonymous access, every device
   confined to its own topics; devices connect with TLS client certificates, the server with a password over TLS),
   and the fleet server on SQLite.
2. A digits classifier trained on scikit-learn's real handwritten digits, uploaded, and converted by the server for
   every profile in the fleet; the fidelity reports.
3. N agents (`fleet-agent run`, real processes) of different profiles, enrolled with an enrollment token: each
   makes its keys and gets its client certificate from the fleet CA.
4. A canary → waves rollout of version 1.0.0; application traffic (real digits) to the agents' local APIs.
5. Version 1.1.0 (the head fine-tuned): a second rollout that ships binary deltas.
6. Telemetry arriving at the server: requests, latency percentiles per model version.
7. A deliberately bad version (a bloated network, many times slower): the p99-latency gate trips on the canary,
   the rollout aborts and every updated device rolls back.
8. A second model on every device (a parity classifier beside the digits one), rolled out while the digits
   traffic goes on: each device serves both, at /v1/models/{name}/predict.
9. A summary, the URLs to explore; with --keep the fleet stays up until Ctrl-C.

Every process is started in its own session and stopped by this one on exit, on Ctrl-C and on SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.panel import Panel  # noqa: E402
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn  # noqa: E402
from rich.table import Table  # noqa: E402

DEFAULT_PROFILES = ["jetson-orin-nano", "rpi5", "android-arm64", "rpi4", "jetson-orin-nano"]
MODEL = "digits"
SECOND = "parity"  # the second model on every device: is the digit odd?
console = Console(width=120)


class Interrupted(Exception):
    """SIGTERM or SIGHUP: stop the fleet the way Ctrl-C does."""


def _on_signal(signum, frame):
    raise Interrupted(signal.Signals(signum).name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def wait_port(port: int, timeout: float, proc: subprocess.Popen | None = None, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before listening on {port}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"{what} never listened on {port}")


# ---------------------------------------------------------------------------------------------------- processes


class Processes:
    """Everything this demo starts: own sessions (a terminal's Ctrl-C reaches only the demo, which then stops
    them in order), their pids recorded in ``pids.json`` for anyone checking that nothing was left behind."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, cmd: list[str], env: dict | None = None) -> subprocess.Popen:
        log = open(self.folder / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                start_new_session=True)
        log.close()
        self.procs.append((name, proc))
        self._record()
        return proc

    def _record(self) -> None:
        tmp = self.folder / ".pids.json"
        tmp.write_text(json.dumps({n: p.pid for n, p in self.procs}))
        tmp.replace(self.folder / "pids.json")

    def stop(self, name: str) -> None:
        for n, p in self.procs:
            if n == name:
                self._signal(p, signal.SIGTERM)
                self._reap(p)

    @staticmethod
    def _signal(p: subprocess.Popen, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, sig)  # the whole group: a server's conversion workers go with it

    def _reap(self, p: subprocess.Popen, timeout: float = 15) -> None:
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            self._signal(p, signal.SIGKILL)
            p.wait()
        self._signal(p, signal.SIGKILL)  # anything of its group still there

    def stop_all(self) -> None:
        for _, p in reversed(self.procs):  # agents first, then the server, the broker last
            if p.poll() is None:
                self._signal(p, signal.SIGTERM)
        for _, p in reversed(self.procs):
            self._reap(p)


def cli(module: str, *args, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    shown = {"fleet_server.cli": "fleet-server", "agent.cli": "fleet-agent"}[module]
    console.print(f"[dim]$ {shown} {' '.join(str(a) for a in args)}[/dim]")
    done = subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=120)
    if check and done.returncode != 0:
        raise RuntimeError(f"{shown} {args[0]} failed ({done.returncode}): {done.stderr[-2000:]}")
    return done


# ---------------------------------------------------------------------------------------------------- models


def train(seed: int, *, base=None, epochs: int = 15, parity: bool = False):
    """A digits CNN (tests.zoo.DigitsCNN); with ``base``, only its last layer retrained (the rest frozen, so the
    INT8 artifact changes little and ships as a small delta). ``parity``: trained to tell odd digits (logit 1) from
    even ones (logit 0) instead."""
    import torch
    from torch import nn

    from tests.zoo import DigitsCNN, digits_data

    torch.manual_seed(seed)
    x_tr, y_tr, x_te, y_te = digits_data(0)
    if parity:
        y_tr, y_te = y_tr % 2, y_te % 2
    model = DigitsCNN()
    if base is not None:
        model.load_state_dict(base.state_dict())
    params = list(model.net[-1].parameters()) if base is not None else list(model.parameters())
    for p in model.parameters():
        p.requires_grad_(any(p is q for q in params))
    opt = torch.optim.Adam(params, lr=2e-3)
    g = torch.Generator().manual_seed(seed)
    xt, yt = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
    for _ in range(epochs):
        for idx in torch.randperm(len(xt), generator=g).split(64):
            noisy = xt[idx] + 0.05 * torch.randn(xt[idx].shape, generator=g) if base is not None else xt[idx]
            loss = nn.functional.cross_entropy(model(noisy), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    return model, accuracy(model, x_te, y_te)


def accuracy(model, x, y) -> float:
    import torch

    with torch.no_grad():
        return float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


def bloated(base, *, scale: int = 8, width: int = 48, layers: int = 8):
    """The bad release: ``base`` behind a careless pre-processing stack. The image is upsampled 8× (nearest),
    passed through identity-initialised 3×3 convolutions at 64×64 and averaged back down, so the answers are
    ``base``'s (up to INT8 rounding) while the work grows from 0.3 M to ~700 M multiply-adds."""
    import copy

    import torch
    from torch import nn

    convs = [nn.Conv2d(1, width, 3, padding=1)] + [nn.Conv2d(width, width, 3, padding=1) for _ in range(layers)]
    for c in convs:
        nn.init.dirac_(c.weight)  # channel 0 carries the image; the others stay zero (and still cost)
        nn.init.zeros_(c.bias)
    reduce = nn.Conv2d(width, 1, 1)
    with torch.no_grad():
        reduce.weight.zero_()
        reduce.weight[0, 0] = 1.0
        reduce.bias.zero_()
    model = nn.Sequential(nn.Upsample(scale_factor=scale, mode="nearest"),
                          *[m for c in convs for m in (c, nn.ReLU())],  # images are ≥ 0: ReLU changes nothing
                          reduce, nn.AvgPool2d(scale), copy.deepcopy(base))
    return model.eval()


def export(model, path: Path) -> Path:
    import torch

    from tests.zoo import export as zoo_export

    return zoo_export(model, (torch.zeros(1, 1, 8, 8),), path, input_names=["image"], output_names=["logits"],
                      dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})


# ---------------------------------------------------------------------------------------------------- traffic


class Traffic:
    """An application on each device: real digits to the agent's local API (~20 requests/s per device, bounded
    in time), keeping the answers' accuracy per model version."""

    def __init__(self, agents: list[dict], images: np.ndarray, labels: np.ndarray, seconds: float = 900):
        self.agents, self.images, self.labels = agents, images, labels
        self.deadline = time.monotonic() + seconds
        self.by_version: Counter = Counter()
        self.correct: Counter = Counter()
        self.failed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        conns = {a["port"]: http.client.HTTPConnection("127.0.0.1", a["port"], timeout=5) for a in self.agents}
        i = 0
        while not self._stop.is_set() and time.monotonic() < self.deadline:
            for conn in conns.values():
                k = i % len(self.images)
                i += 1
                body = json.dumps({"inputs": {"image": {"data": self.images[k:k + 1].ravel().tolist(),
                                                        "shape": [1, 1, 8, 8]}}})
                try:
                    conn.request("POST", f"/v1/models/{MODEL}/predict", body=body,
                                 headers={"Content-Type": "application/json"})
                    resp = conn.getresponse()
                    doc = json.loads(resp.read())
                    if resp.status != 200:
                        self.failed += 1
                        continue
                    version = doc["model"]["version"]
                    self.by_version[version] += 1
                    self.correct[version] += int(np.argmax(doc["outputs"]["logits"]["data"]) == self.labels[k])
                except (OSError, http.client.HTTPException, ValueError, KeyError):
                    self.failed += 1
                    conn.close()
            time.sleep(0.05)

    def accuracy(self, version: str) -> float | None:
        n = self.by_version[version]
        return self.correct[version] / n if n else None

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


# ---------------------------------------------------------------------------------------------------- the demo


class Demo:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.out: Path = args.out.resolve()
        self.procs = Processes(self.out)
        self.summary: dict = {"steps": {}}
        self.agents: list[dict] = []
        self.traffic: Traffic | None = None

    # ------------------------------------------------------------------ 1. the fleet's services

    def services(self) -> None:
        out = self.out
        self.http_port = self.args.port if port_free(self.args.port) else free_port()
        self.tls_port, self.mtls_port = free_port(), free_port()
        files, data = out / "broker", out / "data"
        self.env = {**{k: v for k, v in os.environ.items() if not k.startswith(("EF_SERVER_", "EF_AGENT_"))},
                    "EF_SERVER_DATABASE_URL": f"sqlite:///{out / 'fleet.db'}", "EF_SERVER_DATA_DIR": str(data),
                    "EF_SERVER_PUBLIC_URL": f"http://127.0.0.1:{self.http_port}"}
        console.rule("[bold]1. The fleet's services: keys, CA, a secured broker, the server")
        cli("fleet_server.cli", "migrate", env=self.env)
        cli("fleet_server.cli", "keys", "init", "--root-key-out", out / "offline" / "root-key.pem", env=self.env)
        cli("fleet_server.cli", "pki", "init", env=self.env)
        cli("fleet_server.cli", "pki", "broker-cert", "--out", files, "--host", "127.0.0.1", "--host", "localhost",
            env=self.env)
        pid_file = out / "mosquitto.pid"
        cli("fleet_server.cli", "broker-config", "--out", files, "--conf", out / "mosquitto.conf", "--tls-port",
            self.tls_port, "--mtls-port", self.mtls_port, "--pid-file", pid_file, env=self.env)
        if os.geteuid() == 0:  # as root Mosquitto would switch to its own user, who cannot read these 0640 files
            with open(out / "mosquitto.conf", "a") as f:
                f.write("user root\n")
        from shutil import which

        mosquitto = which("mosquitto") or "/usr/sbin/mosquitto"
        broker = self.procs.start("mosquitto", [mosquitto, "-c", str(out / "mosquitto.conf")])
        wait_port(self.mtls_port, 10, broker, "mosquitto")
        self.env |= {"EF_SERVER_BROKER_URL": f"mqtts://127.0.0.1:{self.tls_port}",
                     "EF_SERVER_DEVICE_BROKER_URL": f"mqtts://127.0.0.1:{self.mtls_port}",
                     "EF_SERVER_BROKER_FILES_DIR": str(files), "EF_SERVER_BROKER_PID_FILE": str(pid_file),
                     "EF_SERVER_MQTT_USERNAME": "fleet-server",
                     "EF_SERVER_MQTT_PASSWORD": (data / "broker" / "server.password").read_text().strip(),
                     "EF_SERVER_ENGINE_TICK_S": "0.2"}
        server = self.procs.start("fleet-server", [sys.executable, "-m", "fleet_server.cli", "serve", "--port",
                                                   str(self.http_port)], env=self.env)
        wait_port(self.http_port, 60, server, "fleet-server")
        token = cli("fleet_server.cli", "tokens", "create", "demo-admin", "--role", "admin",
                    env=self.env).stdout.strip()
        self.api = httpx.Client(base_url=f"http://127.0.0.1:{self.http_port}", timeout=30,
                                headers={"Authorization": f"Bearer {token}"})
        (out / "admin.token").write_text(token)
        os.chmod(out / "admin.token", 0o600)
        console.print(f"broker: devices on [cyan]mqtts://127.0.0.1:{self.mtls_port}[/cyan] (client certificates), "
                      f"the server on [cyan]mqtts://127.0.0.1:{self.tls_port}[/cyan] (password); no plaintext "
                      f"listener, no anonymous access")
        console.print(f"server: [cyan]http://127.0.0.1:{self.http_port}[/cyan] (SQLite at {out / 'fleet.db'})")

    # ------------------------------------------------------------------ 2. models

    def models(self) -> None:
        from tests.zoo import digits_data

        console.rule("[bold]2. Train, register and convert the model")
        _, _, x_te, y_te = digits_data(0)
        self.images, self.labels = x_te, y_te
        calib = io.BytesIO()
        np.savez(calib, image=x_te)
        calib_sha = self._upload(calib.getvalue())
        with console.status("training on scikit-learn's real handwritten digits ..."):
            v1, acc1 = train(0)
            v2, acc2 = train(1, base=v1, epochs=4)
            bad = bloated(v2)
        self.versions = {"1.0.0": (v1, acc1, "digits CNN"), "1.1.0": (v2, acc2, "head fine-tuned"),
                         "2.0.0": (bad, accuracy(bad, x_te, y_te), "1.1.0 behind a 64×64 pre-processing stack: "
                                                                   "~2,000× the multiply-adds")}
        profiles = sorted(set(self.profiles))
        jobs = {}
        for version, (model, acc, what) in self.versions.items():
            path = export(model, self.out / f"digits-{version}.onnx")
            body = {"name": MODEL, "version": version, "source_sha256": self._upload(path.read_bytes()),
                    "calibration_sha256": calib_sha}
            self._ok(self.api.post("/v1/models", json=body))
            jobs[version] = self._ok(self.api.post(f"/v1/models/{MODEL}/{version}/conversions",
                                                   json={"profiles": profiles}))["id"]
            console.print(f"{MODEL} {version}: {what}; FP32 test accuracy {acc:.1%}; conversion job {jobs[version]}")
        table = Table(title="conversion reports (fidelity of the INT8 artifact against FP32, on held-out digits)")
        for col in ("version", "profile", "format", "status", "size", "cosine", "top-1 agreement"):
            table.add_column(col)
        shippable: dict[str, set[str]] = {}
        with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=console,
                      transient=True) as bar:
            task = bar.add_task("converting", total=len(jobs))
            for version, job_id in jobs.items():
                bar.update(task, description=f"converting {version} for {', '.join(profiles)}")
                job = self._wait_job(job_id)
                bar.advance(task)
                for a in job["artifacts"]:
                    report = self.api.get(f"/v1/artifacts/{a['report_sha256']}").json()
                    fid = report["fidelity"][0] if report.get("fidelity") else {}
                    if a["status"] == "shippable":
                        shippable.setdefault(version, set()).add(a["profile"])
                    table.add_row(version, a["profile"], a["format"],
                                  "[green]shippable[/green]" if a["status"] == "shippable" else f"[red]{a['status']}",
                                  f"{(a['size'] or 0) / 1e3:.0f} kB" if a["size"] else "-",
                                  f"{fid.get('cosine', 0):.5f}" if fid else "-",
                                  f"{fid['top1_agreement']:.2%}" if fid.get("top1_agreement") is not None else "-")
        console.print(table)
        missing = {v: sorted(set(profiles) - shippable.get(v, set())) for v in self.versions}
        self.summary["steps"]["convert"] = {"jobs": jobs, "shippable": {v: sorted(p) for v, p in shippable.items()},
                                            "fp32_accuracy": {v: a for v, (_, a, _) in self.versions.items()}}
        if any(missing[v] for v in ("1.0.0", "1.1.0")):
            raise RuntimeError(f"the converter refused artifacts the demo needs: {missing}")

    def _upload(self, data: bytes) -> str:
        return self._ok(self.api.post("/v1/artifacts", content=data))["sha256"]

    def _wait_job(self, job_id: int, timeout: float = 600) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.api.get(f"/v1/jobs/{job_id}").json()
            if job["status"] in ("succeeded", "failed"):
                if job["status"] == "failed":
                    raise RuntimeError(f"conversion job {job_id} failed: {job['log'][-1500:]}")
                return job
            time.sleep(0.5)
        raise TimeoutError(f"conversion job {job_id} still running after {timeout:.0f} s")

    @staticmethod
    def _ok(r: httpx.Response) -> dict:
        if r.status_code >= 400:
            raise RuntimeError(f"{r.request.method} {r.request.url.path} → {r.status_code}: {r.text[:500]}")
        return r.json()

    # ------------------------------------------------------------------ 3. agents

    def fleet(self) -> None:
        console.rule(f"[bold]3. Enroll and start {len(self.profiles)} agents")
        token = self._ok(self.api.post("/v1/enrollment-tokens", json={"max_uses": len(self.profiles),
                                                                      "expires_in_s": 3600,
                                                                      "tags": ["demo"]}))["token"]
        agent_env = {**{k: v for k, v in os.environ.items() if not k.startswith(("EF_SERVER_", "EF_AGENT_"))},
                     "EF_AGENT_TELEMETRY_INTERVAL_S": "1", "PYTHONUNBUFFERED": "1"}
        for i, profile in enumerate(self.profiles):
            port, cfg = free_port(), self.out / f"agent{i}" / "agent.toml"
            cli("agent.cli", "enroll", "--server", f"http://127.0.0.1:{self.http_port}", "--token", token,
                "--profile", profile, "--config", cfg, "--state-dir", self.out / f"agent{i}" / "state",
                "--api-port", port, "--client-cert", "--tag", f"unit:{i}", env=agent_env)
            device_id = next(line.split("=", 1)[1].strip().strip('"') for line in cfg.read_text().splitlines()
                             if line.startswith("device_id"))
            self.agents.append({"id": device_id, "profile": profile, "port": port, "config": cfg})
        for i, a in enumerate(self.agents):
            proc = self.procs.start(f"agent{i}", [sys.executable, "-m", "agent.cli", "run", "--config",
                                                  str(a["config"])], env=agent_env)
            wait_port(a["port"], 60, proc, f"agent{i}")
        ids = {a["id"] for a in self.agents}
        self._wait(lambda: ids <= {d["id"] for d in self.api.get("/v1/devices", params={"online": True,
                                                                                        "limit": 500}).json()
                                   ["items"]}, 60, "every agent online")
        table = Table(title="devices (enrolled with their own keys; MQTT over mutual TLS, CN = device id)")
        for col in ("device", "profile", "local API", "online"):
            table.add_column(col)
        for a in self.agents:
            table.add_row(a["id"], a["profile"], f"http://127.0.0.1:{a['port']}/v1/models", "[green]yes")
        console.print(table)
        self.summary["steps"]["enroll"] = {"devices": len(self.agents), "online": len(ids),
                                           "profiles": sorted(set(self.profiles))}

    # ------------------------------------------------------------------ rollouts

    def rollout(self, version: str, *, title: str, gates: dict | None = None, on_fail: str = "pause",
                strategy: dict | None = None, expect: set[str] = frozenset({"completed"}), model: str = MODEL) -> dict:
        body = {"name": title, "model": model, "version": version, "selector": {"tags": ["demo"]},
                "strategy": strategy or {"canary_percent": 20, "waves_percent": [60, 100], "soak_s": 1},
                "gates": gates or {"max_failure_share": 0.2}, "on_gate_failure": on_fail, "start": True}
        r = self._ok(self.api.post("/v1/rollouts", json=body))
        n = len(self.agents)
        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[counts]}"),
                      TimeElapsedColumn(), console=console) as bar:
            task = bar.add_task(f"rollout {r['id']} → {model} {version}", total=n, counts="")
            deadline = time.monotonic() + self.args.stage_timeout
            while time.monotonic() < deadline:
                r = self.api.get(f"/v1/rollouts/{r['id']}").json()
                counts = r["counts"]
                bar.update(task, completed=counts.get("installed", 0) + counts.get("rolled_back", 0),
                           description=f"rollout {r['id']} → {model} {version}: {r['state']}, stage {r['stage']}",
                           counts=" ".join(f"{k} {v}" for k, v in sorted(counts.items())))
                if r["state"] in ("completed", "aborted", "paused"):
                    break
                time.sleep(0.3)
        if r["state"] not in expect:
            raise RuntimeError(f"rollout {r['id']} ended {r['state']} (expected {sorted(expect)}): "
                               f"{r['evaluation']} {r['notes']}")
        return r

    def members_table(self, rollout_id: int, title: str) -> list[dict]:
        members = self.api.get(f"/v1/rollouts/{rollout_id}/devices").json()
        table = Table(title=title)
        for col in ("device", "profile", "status", "delivery", "bytes sent", "reason"):
            table.add_column(col)
        profile = {a["id"]: a["profile"] for a in self.agents}
        for m in members:
            table.add_row(m["device_id"], profile.get(m["device_id"], "?"), m["status"], m["delivery"],
                          f"{m['bytes_offered']:,}", m["reason"] if m["reason"] != "ok" else "")
        console.print(table)
        return members

    def running_versions(self) -> dict[str, str]:
        out = {}
        with httpx.Client(timeout=5) as c:
            for a in self.agents:
                try:
                    out[a["id"]] = c.get(f"http://127.0.0.1:{a['port']}/v1/models/{MODEL}").json().get("version")
                except httpx.HTTPError:
                    out[a["id"]] = None
        return out

    def first_release(self) -> None:
        console.rule("[bold]4. Canary → waves: version 1.0.0 to the fleet")
        r = self.rollout("1.0.0", title="first release")
        self.members_table(r["id"], f"rollout {r['id']}: {r['state']}")
        self.traffic = Traffic(self.agents, self.images, self.labels)
        self._wait(lambda: self.traffic.by_version["1.0.0"] >= 20 * len(self.agents), 60, "traffic on 1.0.0")
        acc = self.traffic.accuracy("1.0.0")
        console.print(f"application traffic: {self.traffic.by_version['1.0.0']} requests answered on the devices, "
                      f"on-device accuracy {acc:.1%} (real digits, INT8)")
        self.summary["steps"]["rollout_1"] = {"id": r["id"], "state": r["state"], "counts": r["counts"]}

    def delta_release(self) -> None:
        console.rule("[bold]5. Version 1.1.0: a second rollout, shipped as binary deltas")
        r = self.rollout("1.1.0", title="head fine-tuned")
        members = self.members_table(r["id"], f"rollout {r['id']}: {r['state']} (delta = bsdiff/zstd patch "
                                              f"against the artifact the device runs)")
        deltas = sum(m["delivery"] == "delta" for m in members)
        sent = sum(m["bytes_offered"] for m in members)
        self._wait(lambda: self.traffic.by_version["1.1.0"] >= 10 * len(self.agents), 60, "traffic on 1.1.0")
        self.summary["steps"]["rollout_2"] = {"id": r["id"], "state": r["state"], "counts": r["counts"],
                                              "deltas": deltas, "bytes_sent": sent}

    def telemetry(self) -> None:
        console.rule("[bold]6. Telemetry at the server")
        time.sleep(2.5)  # a couple of telemetry windows (agents report every second in this demo)
        table = Table(title="GET /v1/telemetry?model_version=… (merged latency histograms across devices)")
        for col in ("model version", "windows", "requests", "errors", "p50 ms", "p99 ms", "on-device accuracy"):
            table.add_column(col)
        totals = {}
        for version in ("1.0.0", "1.1.0"):
            t = self.api.get("/v1/telemetry", params={"model_version": f"{MODEL} {version}", "bucket_s": 86_400,
                                                      "since": time.time() - 3600}).json()
            s = t["series"][-1] if t["series"] else {}
            totals[version] = {"windows": t["windows"], "requests": sum(x["requests"] for x in t["series"]),
                               "errors": sum(x["errors"] for x in t["series"]), "p50_ms": s.get("p50_ms"),
                               "p99_ms": s.get("p99_ms")}
            acc = self.traffic.accuracy(version)
            table.add_row(version, str(t["windows"]), str(totals[version]["requests"]),
                          str(totals[version]["errors"]), str(s.get("p50_ms")), str(s.get("p99_ms")),
                          f"{acc:.1%}" if acc is not None else "-")
        console.print(table)
        stats = self.api.get("/v1/ingest/stats").json()
        console.print(f"ingest: {stats.get('tm', 0)} telemetry batches, {stats.get('evt', 0)} update events, "
                      f"{stats.get('state', 0)} state reports, {stats.get('invalid', 0)} invalid")
        self.summary["steps"]["telemetry"] = {"by_version": totals, "ingest": stats}

    def bad_release(self) -> None:
        console.rule("[bold]7. A bad version: the latency gate trips, the rollout aborts, devices roll back")
        time.sleep(2)  # a baseline on 1.1.0 for the same devices
        r = self.rollout("2.0.0", title="bloated model", on_fail="abort",
                         gates={"max_failure_share": 0.2, "max_p99_ratio": 2.0, "min_requests": 40},
                         strategy={"canary_percent": 40, "waves_percent": [100], "soak_s": 4},
                         expect={"aborted"})
        console.print(Panel("\n".join(r["evaluation"].get("reasons", [])) or str(r["evaluation"]),
                            title=f"rollout {r['id']} {r['state']}: gate verdict", border_style="red"))
        self._wait(lambda: "installed" not in self.api.get(f"/v1/rollouts/{r['id']}").json()["counts"], 60,
                   "the updated devices rolled back")
        members = self.members_table(r["id"], f"rollout {r['id']}: after the automatic rollback")
        self._wait(lambda: set(self.running_versions().values()) == {"1.1.0"}, 60, "every device on 1.1.0")
        versions = self.running_versions()
        console.print(f"every device runs {MODEL} {', '.join(sorted(set(map(str, versions.values()))))} again")
        self.summary["steps"]["bad_rollout"] = {
            "id": r["id"], "state": r["state"], "reasons": r["evaluation"].get("reasons", []),
            "p99_ratio": r["evaluation"].get("figures", {}).get("p99_ratio"),
            "rolled_back": sum(m["status"] == "rolled_back" for m in members),
            "never_offered": sum(m["status"] == "pending" for m in members), "running": versions}

    def second_model(self) -> None:
        """A parity classifier beside the digits one: registered, converted and rolled out like any model; the
        digits traffic goes on during its rollout (an install of one model touches no other's requests)."""
        console.rule(f"[bold]8. A second model on every device: {SECOND} beside {MODEL}")
        with console.status("training the parity classifier ..."):
            model, acc = train(2, parity=True)
        path = export(model, self.out / f"{SECOND}-1.0.0.onnx")
        calib = io.BytesIO()
        np.savez(calib, image=self.images)
        body = {"name": SECOND, "version": "1.0.0", "source_sha256": self._upload(path.read_bytes()),
                "calibration_sha256": self._upload(calib.getvalue())}
        self._ok(self.api.post("/v1/models", json=body))
        job = self._ok(self.api.post(f"/v1/models/{SECOND}/1.0.0/conversions",
                                     json={"profiles": sorted(set(self.profiles))}))["id"]
        converted = self._wait_job(job)
        console.print(f"{SECOND} 1.0.0: odd or even; FP32 test accuracy {acc:.1%}; conversion job {job}: "
                      f"{sum(a['status'] == 'shippable' for a in converted['artifacts'])} shippable artifact(s)")
        failed_before = self.traffic.failed
        r = self.rollout("1.0.0", title="second model", model=SECOND)
        table = Table(title="each device's models (GET /v1/models on the device)")
        for col in ("device", "profile", "models", f"{SECOND}: odd?", "answer"):
            table.add_column(col)
        both = 0
        with httpx.Client(timeout=5) as c:
            for a in self.agents:
                listed = c.get(f"http://127.0.0.1:{a['port']}/v1/models").json()["models"]
                names = {m["name"]: m.get("version") for m in listed if m["loaded"]}
                both += {MODEL, SECOND} <= set(names)
                k = int(np.flatnonzero(self.labels % 2 == 1)[0])
                doc = c.post(f"http://127.0.0.1:{a['port']}/v1/models/{SECOND}/predict",
                             json={"inputs": {"image": {"data": self.images[k:k + 1].ravel().tolist(),
                                                        "shape": [1, 1, 8, 8]}}}).json()
                odd = bool(np.argmax(doc["outputs"]["logits"]["data"]) == 1)
                table.add_row(a["id"], a["profile"], ", ".join(f"{n} {v}" for n, v in sorted(names.items())),
                              f"digit {self.labels[k]}", "odd" if odd else "even")
        console.print(table)
        self.summary["steps"]["second_model"] = {"id": r["id"], "state": r["state"], "counts": r["counts"],
                                                 "devices_with_both": both,
                                                 "digits_failed_during": self.traffic.failed - failed_before}

    # ------------------------------------------------------------------ end

    def finish(self) -> None:
        console.rule("[bold]9. Summary")
        s = self.summary["steps"]
        table = Table(show_header=True)
        table.add_column("step")
        table.add_column("outcome")
        table.add_row("fleet", f"{s['enroll']['devices']} agents ({', '.join(s['enroll']['profiles'])}), mutual TLS")
        table.add_row("convert", "; ".join(f"{v}: {len(p)} profile(s) shippable"
                                           for v, p in s["convert"]["shippable"].items()))
        table.add_row("release 1.0.0", f"{s['rollout_1']['state']} {s['rollout_1']['counts']}")
        table.add_row("release 1.1.0", f"{s['rollout_2']['state']} {s['rollout_2']['counts']}, "
                                       f"{s['rollout_2']['deltas']} delta(s), {s['rollout_2']['bytes_sent']:,} bytes")
        tel = s["telemetry"]["by_version"]
        table.add_row("telemetry", "; ".join(f"{v}: {t['requests']} requests, p99 {t['p99_ms']} ms"
                                             for v, t in tel.items()))
        bad = s["bad_rollout"]
        ratio = f"p99 ×{bad['p99_ratio']:.1f}" if bad["p99_ratio"] else ""
        table.add_row("bad model", f"{bad['state']} ({ratio}); {bad['rolled_back']} rolled back, "
                                   f"{bad['never_offered']} never offered")
        second = s["second_model"]
        table.add_row("second model", f"{SECOND} {second['state']} {second['counts']}; "
                                      f"{second['devices_with_both']} device(s) serve {MODEL} and {SECOND}")
        table.add_row("traffic", f"{sum(self.traffic.by_version.values())} requests answered, "
                                 f"{self.traffic.failed} failed")
        console.print(table)
        self.summary["traffic"] = {"answered": dict(self.traffic.by_version), "failed": self.traffic.failed}
        self.summary["urls"] = {"console": f"http://127.0.0.1:{self.http_port}/ui",
                                "api_docs": f"http://127.0.0.1:{self.http_port}/docs",
                                "metrics": f"http://127.0.0.1:{self.http_port}/metrics",
                                "agents": [f"http://127.0.0.1:{a['port']}/v1/model" for a in self.agents]}
        signins = self.console_signins()
        console.print(Panel(
            f"[bold]console        {self.summary['urls']['console']}[/bold]\n"
            f"  sign in as a viewer:   {signins['viewer']}\n"
            f"  sign in as an operator: {signins['operator']}\n"
            f"OpenAPI docs   {self.summary['urls']['api_docs']}   (token in {self.out / 'admin.token'})\n"
            f"metrics        {self.summary['urls']['metrics']}\n"
            f"an agent       {self.summary['urls']['agents'][0]}\n"
            f"logs           {self.out}/*.log",
            title="explore"))

    def console_signins(self) -> dict[str, str]:
        """A viewer and an operator token for the console, issued like any API token (kept in 0600 files)."""
        out = {}
        for role in ("viewer", "operator"):
            token = cli("fleet_server.cli", "tokens", "create", f"demo-{role}", "--role", role,
                        env=self.env).stdout.strip()
            (self.out / f"{role}.token").write_text(token)
            os.chmod(self.out / f"{role}.token", 0o600)
            out[role] = token
        return out

    def _wait(self, predicate, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.3)
        raise TimeoutError(f"timed out waiting for {what}")

    def run(self) -> int:
        import shutil

        shutil.rmtree(self.out, ignore_errors=True)
        self.out.mkdir(parents=True)
        self.profiles = [self.args.profiles[i % len(self.args.profiles)] for i in range(self.args.agents)]
        started = time.monotonic()
        ok = False
        try:
            self.services()
            self.models()
            self.fleet()
            self.first_release()
            self.delta_release()
            self.telemetry()
            self.bad_release()
            self.second_model()
            self.finish()
            ok = True
            if self.args.keep:
                console.print("[bold]the fleet keeps running: press Ctrl-C to stop everything[/bold]")
                while True:
                    time.sleep(1)
        except (KeyboardInterrupt, Interrupted) as e:
            console.print(f"[yellow]interrupted ({e or 'Ctrl-C'}): stopping the fleet[/yellow]")
        except Exception as e:
            console.print(f"[red]demo failed: {e}[/red]  (logs in {self.out})")
            self.summary["error"] = str(e)
        finally:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
            if self.traffic is not None:
                self.traffic.stop()
            self.procs.stop_all()
            self.summary["ok"] = ok
            self.summary["seconds"] = round(time.monotonic() - started, 1)
            (self.out / "summary.json").write_text(json.dumps(self.summary, indent=2, default=str))
            console.print(f"stopped every process this demo started; summary in {self.out / 'summary.json'}")
        return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--agents", type=int, default=5, help="agent processes (profiles cycle through --profiles)")
    p.add_argument("--profiles", nargs="+", default=DEFAULT_PROFILES)
    p.add_argument("--out", type=Path, default=ROOT / "demo-out" / "fleet")
    p.add_argument("--port", type=int, default=8000, help="the server's HTTP port (another if taken)")
    p.add_argument("--keep", action=argparse.BooleanOptionalAction, default=sys.stdin.isatty(),
                   help="keep the fleet up after the summary until Ctrl-C (default: when run from a terminal)")
    p.add_argument("--stage-timeout", type=float, default=180, help="seconds a rollout may take")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)
    return Demo(args).run()


if __name__ == "__main__":
    sys.exit(main())
