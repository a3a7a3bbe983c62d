"""``fleet-agent``: the device daemon and the commands an operator runs on the device.

    fleet-agent run      --config /etc/edgefleet/agent.toml
    fleet-agent status   --config ...   (reads the state directory; works with the daemon stopped)
    fleet-agent rollback --config ... [--model NAME]   (asks the running daemon to switch back to the previous slot)
    fleet-agent predict  --config ... [--model NAME] INPUT.npy|.npz   (one request to the local API)
    fleet-agent enroll   --server URL --token T [--profile P] [--config PATH] [--state-dir DIR]

argparse, not typer: on a device every megabyte of the daemon's RSS counts, and typer + click + rich cost ~6 MB.
Exit codes: 0 done, 1 failed (agent unreachable, request refused), 2 bad settings or usage.
"""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import socket
import sys
from pathlib import Path


class Exit(Exception):
    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


def echo(text: str, *, err: bool = False) -> None:
    print(text, file=sys.stderr if err else sys.stdout, flush=True)


def _settings(config: Path | None):
    from pydantic import ValidationError

    from agent.settings import load_settings

    try:
        return load_settings(config)
    except (ValidationError, FileNotFoundError, ValueError) as e:
        echo(f"error: invalid agent settings: {e}", err=True)
        raise Exit(2) from e


def run(config: Path | None, log_level: str = "INFO") -> None:
    """Run the daemon until SIGTERM/SIGINT."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from agent.daemon import Agent

    agent = Agent(_settings(config))
    agent.start()
    print(f"fleet-agent: serving on {agent.api_address}", flush=True)
    agent.run_until_signalled()


def status(config: Path | None) -> None:
    """Per model: the active slot and model, the update journal; the outbox (from the state directory). A device
    with one model also shows its fields at the top level, as before several models per device."""
    from agent.models import MODELS_DIR
    from agent.offers import MODEL_NAME
    from agent.slots import SlotStore
    from agent.store import JOURNAL_PREFIX, LEGACY_JOURNAL, Store

    s = _settings(config)
    state = Path(s.state_dir)
    store = Store(state / "agent.db")
    try:
        models: dict[str, dict] = {}
        names = sorted({p.name for p in (state / MODELS_DIR).glob("*") if p.is_dir() and MODEL_NAME.match(p.name)}
                       | {k[len(JOURNAL_PREFIX):] for k in store.keys(JOURNAL_PREFIX)})
        for name in names:
            snap, _ = store.load_journal(name)
            models[name] = _model_status(SlotStore(state / MODELS_DIR / name, create=False), snap)
        if (state / "slots").exists():  # not migrated yet (the daemon migrates on its next start)
            legacy = SlotStore(state, create=False)
            active = legacy.active()
            snap, _ = store.read_journal(LEGACY_JOURNAL)
            models[active.model if active else "(unmigrated)"] = _model_status(legacy, snap)
        out: dict = {"device_id": s.device_id, "profile": s.profile}
        if len(models) == 1:
            out.update(next(iter(models.values())))
        out.update(models=models, outbox=store.outbox_size())
    finally:
        store.close()
    print(json.dumps(out, indent=2))


def _model_status(slots, snap) -> dict:
    active = slots.active()
    return {"pointer": slots.pointer(),
            "active": None if active is None else {"slot": active.slot, "model": active.model,
                                                   "version": active.model_version, "sha256": active.sha256,
                                                   "format": active.format},
            "update": {"state": snap.state.value, "job": snap.job, "reason": snap.reason, "detail": snap.detail}}


def _request(s, method: str, path: str, body: bytes = b"", content_type: str = "application/json"):
    if s.api_socket:
        conn: http.client.HTTPConnection = _UnixConnection(str(s.api_socket))
    else:
        conn = http.client.HTTPConnection(s.api_host, s.api_port, timeout=30)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": content_type})
        resp = conn.getresponse()
        return resp.status, resp.getheader("Content-Type", ""), resp.read()
    except OSError as e:
        echo(f"error: the agent's local API is not reachable ({e}); is `fleet-agent run` up?", err=True)
        raise Exit(1) from e
    finally:
        conn.close()


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str):
        super().__init__("localhost", timeout=30)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self._path)


def _model_path(model: str | None, action: str) -> str:
    return f"/v1/{action}" if model is None else f"/v1/models/{model}/{action}"


def rollback(config: Path | None, model: str | None = None) -> None:
    """Ask the running daemon to switch the model back to its previous slot."""
    code, _, body = _request(_settings(config), "POST", _model_path(model, "rollback"))
    echo(body.decode())
    raise Exit(0 if code == 202 else 1)


def predict(config: Path | None, data: Path, model: str | None = None) -> None:
    """Send one request to the local API and print the outputs."""
    import io

    import numpy as np

    kind = "application/x-npz" if data.suffix == ".npz" else "application/x-npy"
    code, ctype, body = _request(_settings(config), "POST", _model_path(model, "predict"), data.read_bytes(), kind)
    if code != 200:
        echo(f"error {code}: {body.decode(errors='replace')}", err=True)
        raise Exit(1)
    if ctype.startswith("application/x-npy"):
        outputs = {"output": np.load(io.BytesIO(body))}
    else:
        with np.load(io.BytesIO(body)) as z:
            outputs = {k: z[k] for k in z.files}
    for name, value in outputs.items():
        echo(f"{name} {list(value.shape)} {value.dtype}: {np.array2string(value, threshold=20)}")


def enroll(args: argparse.Namespace) -> None:
    from agent.enroll import EnrollError
    from agent.enroll import enroll as do_enroll

    try:
        done = do_enroll(server=args.server, token=args.token, profile=args.profile, config=args.config,
                         state_dir=args.state_dir, tags=args.tag or [], api_port=args.api_port, force=args.force,
                         client_cert=args.client_cert)
    except EnrollError as e:
        echo(f"error: {e}", err=True)
        raise Exit(1) from e
    echo(f"enrolled as {done['device_id']} ({done['profile']}); config written to {done['config']}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fleet-agent", description="The edgefleet device agent.")
    sub = p.add_subparsers(dest="command", required=True)
    for name, text in (("run", "run the daemon until SIGTERM/SIGINT"),
                       ("status", "active slot and model, update journal, outbox (from the state directory)"),
                       ("rollback", "ask the running daemon to switch back to the previous slot"),
                       ("predict", "send one request to the local API and print the outputs")):
        cmd = sub.add_parser(name, help=text, description=text)
        cmd.add_argument("--config", "-c", type=Path, help="agent TOML (EF_AGENT_* environment variables override)")
        if name == "run":
            cmd.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
        if name == "predict":
            cmd.add_argument("data", type=Path, help=".npy (one input) or .npz (one array per input)")
        if name in ("predict", "rollback"):
            cmd.add_argument("--model", "-m", help="which of the device's models (needed when it has several)")
    e = sub.add_parser("enroll", help="create this device's keys, enroll with the fleet server, write the config")
    e.add_argument("--server", required=True, help="fleet server URL, e.g. https://fleet.example.com")
    e.add_argument("--token", required=True, help="an enrollment token from the fleet's admin")
    e.add_argument("--profile", help="hardware profile id (or the token's default)")
    e.add_argument("--config", type=Path, default=Path("/etc/edgefleet/agent.toml"))
    e.add_argument("--state-dir", type=Path, default=Path("/var/lib/edgefleet"))
    e.add_argument("--tag", action="append", help="a tag for this device (repeatable)")
    e.add_argument("--api-port", type=int, default=8470)
    e.add_argument("--force", action="store_true", help="enroll again over an existing config")
    e.add_argument("--client-cert", action="store_true",
                   help="also get a TLS client certificate from the fleet CA (mutual TLS with the broker)")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    try:
        if args.command == "run":
            run(args.config, args.log_level)
        elif args.command == "enroll":
            enroll(args)
        elif args.command == "predict":
            predict(args.config, args.data, args.model)
        elif args.command == "rollback":
            rollback(args.config, args.model)
        else:
            status(args.config)
    except Exit as e:
        sys.exit(e.code)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
