"""docker-compose.yml (the multi-machine layout, docs/operations.md "Past one machine") stays in step with the code:
the Dockerfiles it builds exist and take the build arguments it passes, every `fleet-server` command it runs exists
(in the typer app and as the installed console script) and accepts the options given, every EF_SERVER_* it names is
a setting and its values validate, dependencies name real services, and no published port is taken twice. There is
no Docker engine here: the file is read as Compose would read it, interpolation included."""

import re
import shlex
import subprocess
import sys
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import typer
import typer.main
import yaml

from fleet_server.cli import app
from fleet_server.settings import ServerSettings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
FLEET_DOCKERFILE = ROOT / "Dockerfile.fleet"
FLEET_SERVER = Path(sys.executable).with_name("fleet-server")  # the console script of this environment
PREFIX = "EF_SERVER_"
# click's usage errors: click's own class, or the copy newer typer releases vendor (typer._click)
CLICK_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")

_VAR = re.compile(r"\$\$|\$\{(?P<name>\w+)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}|\$(?P<bare>\w+)")


def _interpolate(value, env: dict[str, str] | None = None):
    """Compose's interpolation with an empty environment (or ``env``): defaults apply, required variables become a
    placeholder, ``$$`` is a literal ``$`` (left for the container's shell)."""
    env = env or {}

    def one(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group("name") or m.group("bare")
        if name in env:
            return env[name]
        op, arg = m.group("op"), m.group("arg")
        if op and op.endswith("-"):
            return arg
        return f"required-{name.lower()}"

    if isinstance(value, str):
        return _VAR.sub(one, value)
    if isinstance(value, dict):
        return {k: _interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, env) for v in value]
    return value


def _compose() -> dict:
    doc = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(doc, dict) and doc.get("services"), "docker-compose.yml has no services"
    return _interpolate(doc)


def _words(value) -> list[str]:
    if value is None:
        return []
    return shlex.split(value) if isinstance(value, str) else [str(v) for v in value]


def _dockerfile(service: dict) -> Path | None:
    build = service.get("build")
    if build is None:
        return None
    if isinstance(build, str):
        build = {"context": build}
    context = ROOT / build.get("context", ".")
    return (context / build.get("dockerfile", "Dockerfile")).resolve()


def _fleet_services(doc: dict) -> dict[str, dict]:
    """The services running the fleet image: built from Dockerfile.fleet."""
    fleet = {name: s for name, s in doc["services"].items() if _dockerfile(s) == FLEET_DOCKERFILE.resolve()}
    assert fleet, "no service is built from Dockerfile.fleet"
    return fleet


def _image_entrypoint_and_cmd() -> tuple[list[str], list[str]]:
    text = FLEET_DOCKERFILE.read_text()
    final = text[text.rindex("\nFROM "):]  # the runtime stage

    def instruction(name: str) -> list[str]:
        m = re.search(rf"^{name}\s+(\[.*\])\s*$", final, re.M)
        assert m, f"Dockerfile.fleet has no exec-form {name}"
        return yaml.safe_load(m.group(1))

    return instruction("ENTRYPOINT"), instruction("CMD")


_SHELL_KEYWORDS = {"then", "else", "do", "exec", "!", "{", "("}


def _shell_commands(script: str) -> list[list[str]]:
    """The simple commands of a POSIX shell script (as far as these scripts need: lists, pipes, comments,
    redirections, subshells, a leading `then`/`do`/`exec`)."""
    commands = []
    for line in script.replace("\\\n", " ").splitlines():
        lex = shlex.shlex(line, posix=True, punctuation_chars=True)
        lex.whitespace_split = True
        current: list[str] = []
        tokens = list(lex)
        i = 0
        while i < len(tokens):
            tok = tokens[i]
            if tok in {";", "&&", "||", "|", "&", ")", "(", "{", "}"}:
                if current:
                    commands.append(current)
                current = []
            elif tok in {">", ">>", "<", "<<", ">&", "<&"} or re.fullmatch(r"\d*[<>]+&?", tok):
                i += 1  # the redirection's target
            elif current or tok not in _SHELL_KEYWORDS:  # a keyword leading a command is not its name
                current.append(tok)
            i += 1
        if current:
            commands.append(current)
    return commands


def _fleet_invocations(name: str, service: dict) -> list[list[str]]:
    """The argument lists `fleet-server` gets in this service (after the program name)."""
    image_entrypoint, image_cmd = _image_entrypoint_and_cmd()
    entrypoint = _words(service["entrypoint"]) if "entrypoint" in service else image_entrypoint
    command = _words(service["command"]) if "command" in service else image_cmd
    if entrypoint and Path(entrypoint[0]).name == "fleet-server":
        return [entrypoint[1:] + command]
    if entrypoint and Path(entrypoint[0]).name in ("sh", "bash", "dash"):
        words = entrypoint[1:] + command
        flags = [w for w in words if w.startswith("-") and "c" in w]
        assert flags, f"{name}: a shell entrypoint without -c"
        script = words[words.index(flags[0]) + 1]
        found = [cmd[1:] for cmd in _shell_commands(script) if Path(cmd[0]).name == "fleet-server"]
        assert found, f"{name}: its script runs no fleet-server command"
        return found
    raise AssertionError(f"{name}: built from Dockerfile.fleet but runs {entrypoint + command}, not fleet-server")


def _resolve(args: list[str]) -> tuple[tuple[str, ...], typer.core.TyperCommand, list[str]]:
    """The command path within the typer app, its click command, and the arguments left for it."""
    command = typer.main.get_command(app)
    path: list[str] = []
    rest = list(args)
    while hasattr(command, "commands"):  # a group
        assert rest, f"`fleet-server {' '.join(args)}` names a command group, not a command"
        sub = command.commands.get(rest[0])
        assert sub is not None, (f"`fleet-server {' '.join(args)}`: no command {rest[0]!r} "
                                 f"(there are {sorted(command.commands)})")
        path.append(rest.pop(0))
        command = sub
    return tuple(path), command, rest


def _all_invocations() -> list[tuple[str, list[str]]]:
    doc = _compose()
    return [(name, args) for name, service in _fleet_services(doc).items()
            for args in _fleet_invocations(name, service)]


def _environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: "" if v is None else str(v).lower() if isinstance(v, bool) else str(v) for k, v in env.items()}


def _published(service: dict) -> list[tuple[str, int, str]]:
    """(host address, host port, protocol) for each published port; ranges expanded."""
    out = []
    for port in service.get("ports") or []:
        if isinstance(port, dict):
            published, ip, proto = port.get("published"), port.get("host_ip", ""), port.get("protocol", "tcp")
            if published is None:
                continue
            published = str(published)
        else:
            spec, _, proto = str(port).partition("/")
            proto = proto or "tcp"
            parts = spec.rsplit(":", 2)
            if len(parts) == 1:
                continue  # container port only: Docker picks a free host port
            ip = parts[0].strip("[]") if len(parts) == 3 else ""
            published = parts[-2]
        lo, _, hi = published.partition("-")
        out += [(ip or "0.0.0.0", p, proto) for p in range(int(lo), int(hi or lo) + 1)]
    return out


# --------------------------------------------------------------------------------------------------------- the tests


def test_scaleout_compose_builds_use_dockerfiles_that_exist_with_their_build_args():
    doc = _compose()
    built = {name: s for name, s in doc["services"].items() if "build" in s}
    assert built, "docker-compose.yml builds nothing"
    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    for name, service in built.items():
        dockerfile = _dockerfile(service)
        assert dockerfile.is_file() and dockerfile.is_relative_to(ROOT), f"{name}: no {dockerfile} in the repository"
        declared = set(re.findall(r"^ARG\s+(\w+)", dockerfile.read_text(), re.M))
        args = service["build"].get("args", {}) if isinstance(service["build"], dict) else {}
        if isinstance(args, list):
            args = dict(a.split("=", 1) for a in args)
        assert set(args) <= declared, f"{name}: build args {sorted(set(args) - declared)} are not ARGs of {dockerfile}"
        if "EXTRAS" in args:
            unknown = set(args["EXTRAS"].split(",")) - extras
            assert not unknown, f"{name}: EXTRAS names {sorted(unknown)}, not extras of pyproject.toml"
    # the worker's image is the fleet image with the convert extra
    workers = [s for s in _fleet_services(doc).values() if "worker" in _words(s.get("command"))[:1]]
    assert workers, "no service runs `fleet-server worker`"
    for service in workers:
        assert "convert" in service["build"]["args"]["EXTRAS"].split(","), "a worker's image needs the convert extra"


def test_scaleout_compose_dockerfile_takes_the_extras_build_arg():
    text = FLEET_DOCKERFILE.read_text()
    assert re.search(r"^ARG EXTRAS=server$", text, re.M), "Dockerfile.fleet: ARG EXTRAS (default server) is missing"
    assert '".[${EXTRAS}]"' in text, "Dockerfile.fleet does not install .[${EXTRAS}]"
    # the Makefile's --no-deps line for the convert toolchain, only with the convert extra
    makefile = (ROOT / "Makefile").read_text()
    nodeps = re.search(r"pip install --quiet --no-deps (.+)", makefile).group(1).strip()
    assert re.search(r'case ",\$\{EXTRAS\}," in[\s\\]+\*,convert,\*\)[^;]*--no-deps ' + re.escape(nodeps), text), \
        f"Dockerfile.fleet: `pip install --no-deps {nodeps}` under a `case` on the convert extra is missing"


def test_scaleout_compose_fleet_commands_exist_and_accept_their_options():
    invocations = _all_invocations()
    paths = set()
    for name, args in invocations:
        path, command, rest = _resolve(args)
        paths.add(path)
        known = {opt for p in command.params for opt in (*p.opts, *p.secondary_opts) if opt.startswith("-")}
        given = {a.split("=", 1)[0] for a in rest if a.startswith("--")}
        assert given <= known, (f"{name}: `fleet-server {' '.join(path)}` has no option(s) {sorted(given - known)} "
                                f"(it has {sorted(known)})")
        try:  # values parse too (types, ranges, required arguments); nothing runs
            command.make_context(f"fleet-server {' '.join(path)}", list(rest))
        except (CLICK_ERROR, ValueError) as e:  # typer's own coercion raises pydantic's ValidationError
            message = e.format_message() if isinstance(e, CLICK_ERROR) else str(e)
            raise AssertionError(f"{name}: `fleet-server {' '.join(args)}`: {message}") from e
    assert ("serve",) in paths and ("worker",) in paths and ("migrate",) in paths
    assert FLEET_SERVER.exists(), f"{FLEET_SERVER} is missing (pip install -e '.[server]')"

    def help_of(path: tuple[str, ...]) -> subprocess.CompletedProcess:
        return subprocess.run([str(FLEET_SERVER), *path, "--help"], capture_output=True, text=True, timeout=60,
                              cwd=ROOT, env={"PATH": str(FLEET_SERVER.parent), "COLUMNS": "200"})

    with ThreadPoolExecutor(max_workers=8) as pool:
        for path, proc in zip(sorted(paths), pool.map(help_of, sorted(paths)), strict=True):
            assert proc.returncode == 0, f"fleet-server {' '.join(path)} --help: {proc.returncode}\n{proc.stderr}"
            assert f"fleet-server {' '.join(path)}" in proc.stdout


def test_scaleout_compose_env_vars_are_settings_and_validate():
    fields = set(ServerSettings.model_fields)
    named = set(re.findall(rf"\b{PREFIX}([A-Z0-9_]+)", COMPOSE.read_text() + FLEET_DOCKERFILE.read_text()))
    unknown = {PREFIX + n for n in named if n.lower() not in fields}
    assert not unknown, f"not settings of fleet_server.settings.ServerSettings: {sorted(unknown)}"
    doc = _compose()
    for service in _fleet_services(doc).values():
        env = {k.removeprefix(PREFIX).lower(): v for k, v in _environment(service).items() if k.startswith(PREFIX)}
        ServerSettings(_env_file=None, **env)  # raises on a value the server would refuse at start
    serving = {n: _environment(s) for n, s in _fleet_services(doc).items()
               if any(_resolve(a)[0] == ("serve",) for a in _fleet_invocations(n, s))}
    assert len(serving) >= 2, "the layout has API replicas"
    instances = [env.get(f"{PREFIX}SERVER_INSTANCE") for env in serving.values()]
    assert None not in instances and len(set(instances)) == len(instances), \
        f"each API replica needs its own EF_SERVER_SERVER_INSTANCE: {dict(zip(serving, instances, strict=True))}"
    for name, env in serving.items():
        assert env.get(f"{PREFIX}JOB_QUEUE") == "procrastinate", f"{name}: conversions go to the job queue"
        assert env.get(f"{PREFIX}DATABASE_URL", "").startswith("postgresql"), f"{name}: replicas share PostgreSQL"


def test_scaleout_compose_dependencies_name_services():
    doc = _compose()
    services = doc["services"]
    declared_volumes = set(doc.get("volumes") or {})
    conditions = {"service_started", "service_healthy", "service_completed_successfully"}
    for name, service in services.items():
        deps = service.get("depends_on") or {}
        if isinstance(deps, list):
            deps = {d: {"condition": "service_started"} for d in deps}
        for dep, spec in deps.items():
            assert dep in services and dep != name, f"{name} depends on {dep!r}, which is not another service"
            condition = (spec or {}).get("condition", "service_started")
            assert condition in conditions, f"{name}: unknown condition {condition!r}"
            if condition == "service_healthy":
                check = services[dep].get("healthcheck") or {}
                assert check.get("test") and not check.get("disable"), f"{name} waits for {dep}'s health: it has none"
            if condition == "service_completed_successfully":
                assert services[dep].get("restart", "no") == "no", f"{dep} is one-shot: restart must be \"no\""
        for key in ("pid", "network_mode", "ipc"):
            mode = str(service.get(key, ""))
            if mode.startswith("service:"):
                assert mode.removeprefix("service:") in services, f"{name}: {key} {mode} names no service"
        for volume in service.get("volumes") or []:
            source = volume.get("source", "") if isinstance(volume, dict) else str(volume).split(":")[0]
            if source and not source.startswith((".", "/", "~")) and ":" in str(volume):
                assert source in declared_volumes, f"{name}: volume {source!r} is not declared under volumes:"


def test_scaleout_compose_published_ports_do_not_collide():
    taken: dict[tuple[int, str], list[tuple[str, str]]] = {}
    for name, service in _compose()["services"].items():
        replicas = int((service.get("deploy") or {}).get("replicas", 1))
        for ip, port, proto in _published(service):
            assert replicas == 1, f"{name}: {replicas} replicas cannot all publish host port {port}"
            for other_ip, other in taken.get((port, proto), []):
                assert "0.0.0.0" not in (ip, other_ip) and ip != other_ip, \
                    f"host port {port}/{proto} is published by both {other} and {name}"
            taken.setdefault((port, proto), []).append((ip, name))
    assert taken, "nothing is published: the API at least must be reachable"


def test_scaleout_compose_secrets_come_from_the_environment():
    raw = yaml.safe_load(COMPOSE.read_text())
    for name, service in raw["services"].items():
        for key, value in _environment(service).items():
            if re.search(r"PASSWORD|SECRET", key) and value:
                assert re.fullmatch(r"\$\{\w+:\?[^}]*\}", value), \
                    f"{name}: {key} must come from the environment as ${{VAR:?message}}, not be written here"
        url = _environment(service).get(f"{PREFIX}DATABASE_URL", "")
        if "@" in url:
            password = url.split("://", 1)[1].split("@", 1)[0].partition(":")[2]
            assert re.fullmatch(r"\$\{\w+:\?[^}]*\}", password), f"{name}: the database password is written here"


def test_scaleout_compose_broker_reads_what_broker_config_writes():
    """The broker's configuration is generated by `fleet-server broker-config` in one service and read by Mosquitto
    in another: the same volume at the same path; the replica that rewrites it mounts it there too, names the pid
    file Mosquitto writes, and shares its PID namespace so that its SIGHUP arrives."""
    doc = _compose()
    services = doc["services"]

    def mount(service: dict, target: str) -> str | None:
        for volume in service.get("volumes") or []:
            source, _, rest = str(volume).partition(":")
            if rest.split(":")[0] == target:
                return source
        return None

    configs = [(name, _resolve(args)[2]) for name, args in _all_invocations()
               if _resolve(args)[0] == ("broker-config",)]
    assert configs, "no service runs `fleet-server broker-config`"
    for writer, rest in configs:
        ctx = _resolve(["broker-config", *rest])[1].make_context("broker-config", list(rest))
        conf, out, pid_file = ctx.params["conf"], ctx.params["out"], ctx.params["pid_file"]
        assert conf is not None and pid_file is not None
        volume = mount(services[writer], str(out))
        assert volume, f"{writer} writes the broker files to {out}, which is not a volume"
        readers = [n for n, s in services.items() if str(conf) in _words(s.get("command"))]
        assert readers, f"no service starts a broker with {conf}"
        for reader in readers:
            assert mount(services[reader], str(out)) == volume, f"{reader} does not mount {volume} at {out}"
        owners = {n: _environment(s) for n, s in services.items() if f"{PREFIX}BROKER_FILES_DIR" in _environment(s)}
        assert len(owners) == 1, f"exactly one replica owns the broker files, not {sorted(owners)}"
        for owner, env in owners.items():
            assert env[f"{PREFIX}BROKER_FILES_DIR"] == str(out) and mount(services[owner], str(out)) == volume
            assert env.get(f"{PREFIX}BROKER_PID_FILE") == str(pid_file), f"{owner}: the broker's pid file"
            assert services[owner].get("pid") in {f"service:{r}" for r in readers}, \
                f"{owner} must share the broker's PID namespace to reload it"
