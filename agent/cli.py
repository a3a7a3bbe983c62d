"""``fleet-agent``: the device daemon and the commands an operator runs on the device.

    fleet-agent run      --config /etc/edgefleet/agent.toml
    fleet-agent status   --config ...   (reads the state directory; works with the daemon stopped)
    fleet-agent rollback --config ...   (asks the running daemon to switch back to the previous slot)
    fleet-agent predict  --config ... INPUT.npy|.npz   (one request to the local API)
"""

from __future__ import annotations

import http.client
import json
import logging
import socket
import sys
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="The edgefleet device agent.")
ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="Agent TOML (env EF_AGENT_* overrides).")]


def _settings(config: Path | None):
    from pydantic import ValidationError

    from agent.settings import load_settings

    try:
        return load_settings(config)
    except (ValidationError, FileNotFoundError, ValueError) as e:
        typer.echo(f"error: invalid agent settings: {e}", err=True)
        raise typer.Exit(2) from e


@app.command()
def run(config: ConfigOpt = None, log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING")] = "INFO",
        ) -> None:
    """Run the daemon until SIGTERM/SIGINT."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from agent.daemon import Agent

    agent = Agent(_settings(config))
    agent.start()
    print(f"fleet-agent: serving on {agent.api_address}", flush=True)
    agent.run_until_signalled()


@app.command()
def status(config: ConfigOpt = None) -> None:
    """The active slot and model, the update journal, the outbox (from the state directory)."""
    from agent.slots import SlotStore
    from agent.store import Store

    s = _settings(config)
    store = Store(Path(s.state_dir) / "agent.db")
    try:
        snap, _ = store.load_journal()
        slots = SlotStore(Path(s.state_dir))
        active = slots.active()
        out = {"device_id": s.device_id, "profile": s.profile, "pointer": slots.pointer(),
               "active": None if active is None else {"slot": active.slot, "model": active.model,
                                                      "version": active.model_version, "sha256": active.sha256,
                                                      "format": active.format},
               "update": {"state": snap.state.value, "job": snap.job, "reason": snap.reason, "detail": snap.detail},
               "outbox": store.outbox_size()}
    finally:
        store.close()
    print(json.dumps(out, indent=2))


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
        typer.echo(f"error: the agent's local API is not reachable ({e}); is `fleet-agent run` up?", err=True)
        raise typer.Exit(1) from e
    finally:
        conn.close()


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str):
        super().__init__("localhost", timeout=30)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self._path)


@app.command()
def rollback(config: ConfigOpt = None) -> None:
    """Ask the running daemon to switch back to the previous slot."""
    code, _, body = _request(_settings(config), "POST", "/v1/rollback")
    typer.echo(body.decode())
    raise typer.Exit(0 if code == 202 else 1)


@app.command()
def predict(data: Annotated[Path, typer.Argument(help=".npy (one input) or .npz (one array per input)")],
            config: ConfigOpt = None) -> None:
    """Send one request to the local API and print the outputs."""
    import io

    import numpy as np

    kind = "application/x-npz" if data.suffix == ".npz" else "application/x-npy"
    code, ctype, body = _request(_settings(config), "POST", "/v1/predict", data.read_bytes(), kind)
    if code != 200:
        typer.echo(f"error {code}: {body.decode(errors='replace')}", err=True)
        raise typer.Exit(1)
    if ctype.startswith("application/x-npy"):
        outputs = {"output": np.load(io.BytesIO(body))}
    else:
        with np.load(io.BytesIO(body)) as z:
            outputs = {k: z[k] for k in z.files}
    for name, value in outputs.items():
        typer.echo(f"{name} {list(value.shape)} {value.dtype}: {np.array2string(value, threshold=20)}")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
