"""``fleet-server``: serve the API, migrate the database, manage keys and tokens.

    fleet-server serve [--host 127.0.0.1] [--port 8000] [--workers N]
    fleet-server migrate
    fleet-server keys init --root-key-out PATH | keys show
    fleet-server tokens create NAME --role admin|operator|viewer | tokens revoke ID
    fleet-server enroll-token create [--max-uses N] [--expires-in SECONDS] [--profile P] [--tag T ...]
    fleet-server pki init | pki broker-cert --out DIR --host H... | pki client-cert NAME --out DIR
    fleet-server broker-config --out DIR [--conf FILE --plain-port P --tls-port P --mtls-port P --pid-file F
                               --persistence-dir D]
"""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Annotated

import typer
from sqlmodel import Session

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="The edgefleet fleet server.")
keys_app = typer.Typer(no_args_is_help=True, help="Fleet signing keys.")
tokens_app = typer.Typer(no_args_is_help=True, help="API tokens.")
enroll_app = typer.Typer(no_args_is_help=True, help="Enrollment tokens.")
pki_app = typer.Typer(no_args_is_help=True, help="The fleet's TLS certificate authority.")
app.add_typer(keys_app, name="keys")
app.add_typer(tokens_app, name="tokens")
app.add_typer(enroll_app, name="enroll-token")
app.add_typer(pki_app, name="pki")


def _settings():
    from fleet_server.settings import ServerSettings

    s = ServerSettings()
    s.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # keys, the fleet CA, usually the database
    if s.database_url.startswith("sqlite:///"):
        Path(s.database_url.removeprefix("sqlite:///")).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    return s


def _session(settings) -> Session:
    from fleet_server.db import make_engine

    return Session(make_engine(settings.database_url))


@app.command()
def migrate() -> None:
    """Upgrade the database schema to the newest migration."""
    from fleet_server.migrate import upgrade

    s = _settings()
    upgrade(s.database_url)
    typer.echo(f"database at head ({s.database_url.split('@')[-1]})")


@app.command()
def serve(host: Annotated[str, typer.Option()] = "127.0.0.1", port: Annotated[int, typer.Option()] = 8000,
          workers: Annotated[int, typer.Option(min=1, max=64, help="uvicorn worker processes")] = 1) -> None:
    """Migrate, then serve the API with uvicorn (settings from EF_SERVER_* / the settings file)."""
    import uvicorn

    from fleet_server.app import create_app
    from fleet_server.logs import configure
    from fleet_server.migrate import upgrade

    configure()
    s = _settings()
    upgrade(s.database_url)
    if workers == 1:
        uvicorn.run(create_app(s), host=host, port=port, log_config=None, access_log=False)  # our JSON access log
    else:  # each worker process builds its own app (engine, pools) from the same settings
        uvicorn.run("fleet_server.app:app_from_environment", factory=True, host=host, port=port, workers=workers,
                    log_config=None, access_log=False)


@app.command()
def worker(name: Annotated[str | None, typer.Option(help="This worker's name (default: host:pid).")] = None,
           profiles: Annotated[str | None, typer.Option(help="Comma-separated profile ids to take (default: every "
                                                        "profile this machine can build).")] = None,
           concurrency: Annotated[int, typer.Option(min=1, max=16, help="Parts converted at once (each is CPU- "
                                                    "and RAM-heavy).")] = 1) -> None:
    """Take conversion job parts from the queue (EF_SERVER_JOB_QUEUE=procrastinate, PostgreSQL), convert them in
    the sandbox, store the artifacts and report progress to the job. Needs the convert extra."""
    from fleet_server.logs import configure
    from fleet_server.migrate import upgrade
    from fleet_server.queue import Worker

    configure()
    s = _settings()
    if s.job_queue != "procrastinate":
        raise typer.BadParameter("set EF_SERVER_JOB_QUEUE=procrastinate (and a PostgreSQL database_url): with the "
                                 "local queue the server converts in its own process pool")
    upgrade(s.database_url)
    try:
        w = Worker(s, name=name, profiles=[p.strip() for p in profiles.split(",") if p.strip()] if profiles else None,
                   concurrency=concurrency)
    except ValueError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from e
    typer.echo(f"worker {w.name}: builds {', '.join(w.formats)}; takes {', '.join(w.profiles)}")
    w.run()


@keys_app.command("init")
def keys_init(root_key_out: Annotated[Path, typer.Option(help="Where to write the ROOT private key (move it "
                                                                  "offline afterwards).")]) -> None:
    """Create the root key (written to --root-key-out), the online key and root metadata version 1."""
    from fleet_server.keys import KeysError, init_keys

    try:
        path = init_keys(_settings().data_dir, root_key_out)
    except (KeysError, FileExistsError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from e
    typer.echo(f"root key → {root_key_out} (move it offline); root metadata → {path}")


@keys_app.command("rotate-root")
def keys_rotate_root(old_root_key: Annotated[Path, typer.Option(help="The current root private key (brought back "
                                                                     "from offline for this).")],
                     new_root_key_out: Annotated[Path, typer.Option(help="Where to write the new root key.")],
                     new_online_key: Annotated[bool, typer.Option(help="Also replace the online signing key.")]
                     = False) -> None:
    """Root metadata version N+1, signed by the old and the new root keys."""
    from fleet_server.keys import KeysError, rotate

    try:
        path = rotate(_settings().data_dir, old_root_key=old_root_key, new_root_key_out=new_root_key_out,
                      new_online=new_online_key)
    except (KeysError, FileExistsError, OSError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from e
    typer.echo(f"root metadata → {path}; new root key → {new_root_key_out} (move it offline)")


@keys_app.command("show")
def keys_show() -> None:
    """Root metadata versions and their key ids."""
    from fleet_server.keys import root_versions

    for raw in root_versions(_settings().data_dir):
        signed = json.loads(raw)["signed"]
        typer.echo(json.dumps({"version": signed["version"], "expires": signed["expires"],
                               "roles": {r: v["keyids"] for r, v in signed["roles"].items()}}))


@tokens_app.command("create")
def tokens_create(name: str, role: Annotated[str, typer.Option(help="admin, operator or viewer")] = "viewer") -> None:
    """Create an API token (printed once)."""
    from fleet_server.auth import audit, issue_token
    from fleet_server.models import Role

    try:
        r = Role(role)
    except ValueError as e:
        raise typer.BadParameter("role is admin, operator or viewer") from e
    with _session(_settings()) as session:
        row, token = issue_token(session, name=name, role=r, created_by="cli")
        audit(session, actor="cli", action="token.create", target=f"token:{row.id}", detail=r.value)
    typer.echo(token)


@tokens_app.command("revoke")
def tokens_revoke(token_id: int) -> None:
    from fleet_server.auth import audit
    from fleet_server.models import ApiToken, utcnow

    with _session(_settings()) as session:
        row = session.get(ApiToken, token_id)
        if row is None:
            typer.echo(f"error: no token {token_id}", err=True)
            raise typer.Exit(1)
        row.revoked_at = row.revoked_at or utcnow()
        session.add(row)
        session.commit()
        audit(session, actor="cli", action="token.revoke", target=f"token:{token_id}")
    typer.echo(f"revoked token {token_id}")


@enroll_app.command("create")
def enroll_token_create(max_uses: int = 1, expires_in: int = 7 * 24 * 3600, profile: str | None = None,
                        tag: Annotated[list[str] | None, typer.Option()] = None) -> None:
    """Create an enrollment token (printed once)."""
    from fleet_server.auth import audit, hash_secret, new_secret
    from fleet_server.models import EnrollmentToken, utcnow

    token = new_secret("efe_")
    with _session(_settings()) as session:
        row = EnrollmentToken(token_hash=hash_secret(token), expires_at=utcnow() + timedelta(seconds=expires_in),
                              max_uses=max_uses, profile=profile, tags=sorted(set(tag or [])), created_by="cli")
        session.add(row)
        session.commit()
        audit(session, actor="cli", action="enrollment_token.create", target=f"enrollment_token:{row.id}")
    typer.echo(token)


@app.command("broker-config")
def broker_config(out: Annotated[Path, typer.Option(help="Folder for Mosquitto's passwd, acl (and crl.pem).")],
                  server_user: Annotated[str, typer.Option(help="The server's own MQTT account (replicas 1-15 get "
                                                                "<name>-1 … <name>-15).")] = "fleet-server",
                  conf: Annotated[Path | None, typer.Option(help="Also write a complete mosquitto.conf here.")] = None,
                  bind: Annotated[str, typer.Option(help="Listeners' address (with --conf).")] = "127.0.0.1",
                  plain_port: Annotated[int | None, typer.Option(help="Password listener without TLS.")] = None,
                  tls_port: Annotated[int | None, typer.Option(help="Password listener over TLS.")] = None,
                  mtls_port: Annotated[int | None, typer.Option(help="Client-certificate (mutual TLS) listener.")]
                  = None,
                  pid_file: Annotated[Path | None, typer.Option(help="Mosquitto's pid file (with --conf).")] = None,
                  persistence_dir: Annotated[Path | None, typer.Option(help="Mosquitto's sessions and queues (with "
                                                                            "--conf; default OUT/persistence).")]
                  = None,
                  ) -> None:
    """Write Mosquitto's password file, ACL and (with a fleet CA) CRL from the database, optionally a whole
    mosquitto.conf around them; reload a running broker with SIGHUP afterwards."""
    from fleet_server.auth import new_secret
    from fleet_server.broker import SERVER_INSTANCES, mosquitto_conf, mosquitto_hash, write_broker_files

    s = _settings()
    secret = s.data_dir / "broker" / "server.password"
    if not secret.exists():  # the server's own broker password, made once, readable by the server only
        secret.parent.mkdir(parents=True, exist_ok=True)
        secret.write_text(new_secret("", 24))
        secret.chmod(0o600)
    with _session(s) as session:
        passwd, acl, n = write_broker_files(session, out, server_user=server_user,
                                            server_password_hash=mosquitto_hash(secret.read_text().strip()),
                                            pki_dir=s.pki_folder)
    typer.echo(f"wrote {passwd} ({n} device accounts + {SERVER_INSTANCES} server accounts, {server_user} and "
               f"{server_user}-1 … -{SERVER_INSTANCES - 1}) and {acl}; the server's password is in {secret}")
    if conf is not None:
        if (tls_port or mtls_port) and not (out / "broker.crt").exists():
            typer.echo(f"error: TLS listeners need {out}/broker.crt: run `fleet-server pki broker-cert --out {out}`",
                       err=True)
            raise typer.Exit(2)
        persistence = persistence_dir or out / "persistence"
        try:
            text = mosquitto_conf(out, bind=bind, plain_port=plain_port, tls_port=tls_port, mtls_port=mtls_port,
                                  pid_file=pid_file, persistence_dir=persistence)
        except ValueError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from e
        _broker_writable(persistence)
        conf.write_text(text)
        typer.echo(f"wrote {conf} (sessions persist in {persistence})")


def _broker_writable(folder: Path) -> None:
    """Mosquitto (Debian: user ``mosquitto``) saves its sessions there; run as root, hand the folder to it."""
    import os
    import pwd
    import shutil

    folder.mkdir(mode=0o750, parents=True, exist_ok=True)
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("mosquitto")
        except KeyError:
            return
        shutil.chown(folder, user="mosquitto")


@pki_app.command("init")
def pki_init() -> None:
    """Create the fleet CA (ca.key, ca.crt) in the PKI folder (EF_SERVER_PKI_DIR, default <data_dir>/pki)."""
    from fleet_server.pki import FleetCA, PKIError

    folder = _settings().pki_folder
    try:
        ca = FleetCA.init(folder)
    except PKIError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from e
    typer.echo(f"fleet CA → {folder}/ca.crt (key: {folder}/ca.key, 0600); serial {ca.cert.serial_number:x}")


@pki_app.command("broker-cert")
def pki_broker_cert(out: Annotated[Path, typer.Option(help="The broker files folder (broker.key, broker.crt, "
                                                           "ca.crt).")],
                    host: Annotated[list[str], typer.Option(help="Names/addresses devices use for the broker.")]
                    ) -> None:
    """Issue the broker's TLS server certificate from the fleet CA."""
    from fleet_server.pki import FleetCA, PKIError, write_pair

    try:
        ca = FleetCA.load(_settings().pki_folder)
        key, issued = ca.issue_server(host)
    except PKIError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from e
    write_pair(out, "broker", key, issued.cert_pem)
    (out / "ca.crt").write_bytes(ca.cert_pem)
    typer.echo(f"broker certificate for {', '.join(host)} → {out}/broker.crt (until {issued.not_after:%Y-%m-%d})")


@pki_app.command("client-cert")
def pki_client_cert(name: Annotated[str, typer.Argument(help="The MQTT username the certificate stands for.")],
                    out: Annotated[Path, typer.Option(help="Folder for <name>.key and <name>.crt.")]) -> None:
    """Issue a client certificate (the server's own account on a mutual-TLS listener, an operator's tool)."""
    from cryptography.hazmat.primitives import serialization

    from fleet_server.pki import FleetCA, PKIError, make_csr, new_key, write_pair

    key = new_key()
    try:
        issued = FleetCA.load(_settings().pki_folder).sign_client(make_csr(key), name)
    except PKIError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from e
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    k, c = write_pair(out, name, pem, issued.cert_pem)
    typer.echo(f"client certificate for {name} → {c} (key {k})")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
