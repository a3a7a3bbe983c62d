"""``fleet-convert``: one source model in, one INT8 artifact per hardware profile out, each with its report.

Exit codes:
  0  every artifact is shippable (bundle: built and signed; verify-bundle: verified)
  1  internal error (a bug: please report it with the traceback from --debug)
  2  usage error: bad option, unknown profile
  3  bad input: not a model, truncated model, unsupported ops, calibration data that does not fit
  4  at least one artifact was refused by the fidelity gate or failed to quantize (bundle: nothing written)
  5  verify-bundle: the bundle does not verify (bad signature, untrusted key, altered or missing member)
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from converters.errors import ConvertError
from firmware_profiles import ProfileError, builtin_profile_ids, load_profile

EXIT_OK, EXIT_INTERNAL, EXIT_USAGE, EXIT_INPUT, EXIT_REFUSED = 0, 1, 2, 3, 4

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Convert a model to INT8 artifacts per hardware profile, with a fidelity gate.")


def _console(*, stderr: bool = False) -> Console:
    """A terminal gets its own width; a file or CI log gets a wide one, so tables are not squeezed to 80 columns."""
    console = Console(stderr=stderr)
    if not console.is_terminal:
        console = Console(stderr=stderr, width=int(os.environ.get("COLUMNS", "160")))
    return console


out = _console()
err = _console(stderr=True)


def _fail(message: str, code: int) -> typer.Exit:
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    return typer.Exit(code)


# Data options shared by `convert` and `bundle`.
CalibOpt = Annotated[Path | None, typer.Option("--calib", help=".npz, .npy, folder of .npy or of images.")]
EvalOpt = Annotated[Path | None, typer.Option("--eval", help="Separate evaluation data (same formats).")]
EvalFractionOpt = Annotated[float, typer.Option(help="Share of --calib held out for evaluation without --eval.")]
SyntheticOpt = Annotated[int, typer.Option("--synthetic-calibration",
                                           help="Calibrate on N random samples (marked SYNTHETIC in every report).")]
InputShapeOpt = Annotated[list[str], typer.Option("--input-shape", help="Pin a dynamic input: name=1,3,224,224.")]
ImageSizeOpt = Annotated[str | None, typer.Option(help="Image folders: HEIGHT,WIDTH.")]
LayoutOpt = Annotated[str, typer.Option(help="Image folders: NCHW or NHWC.")]
MeanOpt = Annotated[str, typer.Option(help="Image folders: per-channel mean after scaling to 0..1.")]
StdOpt = Annotated[str, typer.Option(help="Image folders: per-channel std after scaling to 0..1.")]
ChannelOrderOpt = Annotated[str, typer.Option(help="Image folders: RGB or BGR.")]


@app.command()
def profiles(as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False) -> None:
    """List the built-in hardware profiles with their key facts."""
    loaded = [load_profile(p) for p in builtin_profile_ids()]
    if as_json:
        print(json.dumps([p.model_dump(mode="json") for p in loaded], indent=2))
        return
    table = Table(title="hardware profiles")
    for col in ("id", "device", "arch", "accelerator", "RAM", "formats (preferred first)", "INT8 scheme",
                "floor (top-1 / cosine)"):
        table.add_column(col, overflow="fold")
    for p in loaded:
        q = p.artifacts[0].quantization
        scheme = (f"{q.format.value} {'per-channel' if q.per_channel else 'per-tensor'} "
                  f"{q.activation_type.value}/{q.weight_type.value} {q.calibration_method.value}")
        table.add_row(p.id, p.device_class, p.arch, p.accelerator, f"{p.memory.ram_mb} MB",
                      ", ".join(f"{a.format.value} ({a.runtime})" for a in p.artifacts), scheme,
                      f"{p.fidelity.min_top1_agreement:.0%} / {p.fidelity.min_cosine}")
    out.print(table)


def _parse_shapes(values: list[str]) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for v in values:
        name, _, dims = v.partition("=")
        try:
            shapes[name] = tuple(int(d) for d in dims.replace("x", ",").split(","))
        except ValueError:
            raise typer.BadParameter(f"{v!r}: expected NAME=D1,D2,... (e.g. input=1,3,224,224)") from None
        if not name or any(d <= 0 for d in shapes[name]):
            raise typer.BadParameter(f"{v!r}: expected NAME=D1,D2,... with positive dims")
    return shapes


def _floats(text: str, what: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise typer.BadParameter(f"{what}: {text!r} is not a comma-separated list of numbers") from None


@app.command()
def convert(
    model: Annotated[Path, typer.Argument(help="Source model: .onnx (external data allowed) or PyTorch .pt2.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output folder (one sub-folder per profile).")],
    profile: Annotated[list[str], typer.Option("--profile", "-p", help="Profile id or .toml path; repeatable.")]
    = [],  # noqa: B006 - typer reads the default
    all_profiles: Annotated[bool, typer.Option("--all-profiles", help="Every built-in profile.")] = False,
    calib: CalibOpt = None,
    eval_data: EvalOpt = None,
    eval_fraction: EvalFractionOpt = 0.25,
    synthetic_calibration: SyntheticOpt = 0,
    input_shape: InputShapeOpt = [],  # noqa: B006 - typer reads the default
    image_size: ImageSizeOpt = None,
    layout: LayoutOpt = "NCHW",
    mean: MeanOpt = "0,0,0",
    std: StdOpt = "1,1,1",
    channel_order: ChannelOrderOpt = "RGB",
    output_kind: Annotated[list[str], typer.Option(
        "--output-kind", help="Declare what an output is (when inference is wrong): NAME=KIND, KIND one of "
        "classification|softmax, sequence|ctc, detection|yolo, segmentation, regression.")]
    = [],  # noqa: B006
    truth: Annotated[Path | None, typer.Option(
        "--truth", help="Ground truth for the evaluation samples (JSON: output, task, samples): gate on task "
        "accuracy against it too.")] = None,
    search_seconds: Annotated[float, typer.Option(help="The search's budget per quantization scheme, in CPU seconds.")]
    = 240.0,
    latency_runs: Annotated[int, typer.Option(help="Timed runs per model for the latency figures.")] = 30,
    enforce_host_latency: Annotated[bool, typer.Option(
        help="Refuse on this host's INT8 latency even on an x86 CPU without VNNI, whose INT8 kernels run slower "
        "than the targets' (there a latency regression is otherwise reported, not enforced).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the reports as JSON instead of a table.")] = False,
    debug: Annotated[bool, typer.Option(help="Show tracebacks and library logs.")] = False,
) -> None:
    """Quantize MODEL for each profile, measure fidelity against FP32, and refuse what falls below the floor."""
    logging.basicConfig(level=logging.INFO if debug else logging.ERROR)
    if not debug:
        logging.getLogger().setLevel(logging.ERROR)  # ONNX Runtime's quantizer logs advice at WARNING
    args = dict(locals())
    _guarded(debug, lambda: _convert(**args))


def _check_data_options(calib: Path | None, synthetic_calibration: int, eval_fraction: float,
                        image_size: str | None, layout: str, mean: str, std: str, channel_order: str):
    """Validate the data options shared by convert and bundle; returns the image preprocessing, if declared."""
    from converters.calibration import ImagePrep

    if (calib is None) == (synthetic_calibration == 0):
        raise typer.BadParameter("give --calib DATA, or --synthetic-calibration N to calibrate on random data")
    if not 0.0 < eval_fraction < 1.0:
        raise typer.BadParameter("--eval-fraction must be between 0 and 1")
    if layout not in ("NCHW", "NHWC") or channel_order not in ("RGB", "BGR"):
        raise typer.BadParameter("--layout is NCHW or NHWC; --channel-order is RGB or BGR")
    if not image_size:
        return None
    h, w = (int(x) for x in _floats(image_size, "--image-size"))
    return ImagePrep(h, w, layout, _floats(mean, "--mean"), _floats(std, "--std"), channel_order)  # type: ignore[arg-type]


@contextmanager
def _progress(quiet: bool):
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=err,
                  transient=True, disable=quiet or not err.is_terminal) as progress:
        task = progress.add_task("loading model", total=None)
        yield lambda message: progress.update(task, description=message)


def parse_output_kinds(items: list[str]):
    """``NAME=KIND`` declarations; KIND is an output kind or the name of its decoder (yolo, ctc, softmax)."""
    from converters.tasks import DECODERS, OutputKind

    kinds = {}
    for item in items:
        name, _, kind = item.partition("=")
        found = DECODERS.get(kind) or next((k for k in OutputKind if k.value == kind), None)
        if not name or found is None:
            known = ", ".join([*(k.value for k in OutputKind), *DECODERS])
            raise typer.BadParameter(f"--output-kind {item!r}: NAME=KIND, KIND one of {known}")
        kinds[name] = found
    return kinds


def _converter(work: Path, step, *, model: Path, calib: Path | None, eval_data: Path | None, eval_fraction: float,
               synthetic_calibration: int, input_shape: list[str], prep, options, truth=None):
    from converters.calibration import load_dataset, split, synthetic_dataset
    from converters.pipeline import Converter
    from converters.source import load_source

    source = load_source(model, work, input_shapes=_parse_shapes(input_shape))
    step("reading calibration data")
    data = synthetic_dataset(source.inputs, synthetic_calibration) if synthetic_calibration else \
        load_dataset(calib, source.inputs, image_prep=prep)  # type: ignore[arg-type]
    if eval_data is not None:
        calibration, evaluation = data, load_dataset(eval_data, source.inputs, image_prep=prep)
    else:
        calibration, evaluation = split(data, eval_fraction)
    return Converter(source, calibration, evaluation, work, options, progress=step, truth=truth)


def _guarded(debug: bool, body) -> None:
    """Run a command body, mapping errors to one line and an exit code."""
    try:
        code = body()
    except typer.Exit:
        raise
    except (typer.BadParameter, ProfileError) as e:
        raise _fail(str(e), EXIT_USAGE) from e
    except ConvertError as e:
        if debug:
            raise
        raise _fail(str(e), e.exit_code) from e
    except Exception as e:
        if debug:
            raise
        raise _fail(f"internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)",
                    EXIT_INTERNAL) from e
    raise typer.Exit(code)


def _convert(*, model: Path, output: Path, profile: list[str], all_profiles: bool, calib: Path | None,
             eval_data: Path | None, eval_fraction: float, synthetic_calibration: int, input_shape: list[str],
             image_size: str | None, layout: str, mean: str, std: str, channel_order: str,
             output_kind: list[str], truth: Path | None, search_seconds: float, latency_runs: int,
             enforce_host_latency: bool, as_json: bool, debug: bool) -> int:
    from converters.pipeline import ConvertOptions
    from converters.report import Status, summary_rows
    from converters.truth import load_truth

    if all_profiles == bool(profile):
        raise typer.BadParameter("give --profile (one or more) or --all-profiles")
    prep = _check_data_options(calib, synthetic_calibration, eval_fraction, image_size, layout, mean, std,
                               channel_order)
    kinds = parse_output_kinds(output_kind)
    if search_seconds <= 0:
        raise typer.BadParameter("--search-seconds must be positive")
    if truth is not None and eval_data is None:
        raise typer.BadParameter("--truth needs --eval: its labels follow the evaluation samples, in order")
    labels = load_truth(truth) if truth is not None else None
    targets = [load_profile(p) for p in (builtin_profile_ids() if all_profiles else profile)]

    output.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fleet-convert-") as tmp, _progress(as_json) as step:
        converter = _converter(Path(tmp), step, model=model, calib=calib, eval_data=eval_data,
                               eval_fraction=eval_fraction, synthetic_calibration=synthetic_calibration,
                               input_shape=input_shape, prep=prep, truth=labels,
                               options=ConvertOptions(latency_runs=latency_runs, output_kinds=kinds,
                                                      search_seconds=search_seconds,
                                                      enforce_host_latency=enforce_host_latency))
        reports = []
        for p in targets:
            step(f"{p.id}")
            reports += converter.convert(p, output)

    if as_json:
        print(json.dumps([r.model_dump(mode="json") for r in reports], indent=2))
    else:
        _print_summary(reports, summary_rows(reports), output)
    refused = [r for r in reports if r.status in (Status.REFUSED, Status.FAILED)]
    return EXIT_REFUSED if refused else EXIT_OK


def _print_summary(reports, rows: list[dict[str, str]], output: Path) -> None:
    colors = {"shippable": "green", "refused": "red", "failed": "red"}
    table = Table(title=f"fleet-convert → {output}")
    for col in rows[0] if rows else []:
        table.add_column(col, overflow="fold")
    for row in rows:
        table.add_row(*[f"[{colors[v]}]{v}[/]" if k == "status" else v for k, v in row.items()])
    out.print(table)
    for r in reports:
        for reason in r.reasons:
            out.print(f"  {r.profile} {r.format} {r.status.value}: {escape(reason)}", highlight=False)
    notes = sorted({n for r in reports for n in r.notes})
    for n in notes:
        out.print(f"  note: {escape(n)}", highlight=False)
    for r in reports:
        if r.mixed_precision:
            mp = r.mixed_precision
            kept = f"{len(mp.float_nodes)} node(s) in float" + \
                (f" and {len(mp.sixteen_bit_nodes)} with 16-bit activations" if mp.sixteen_bit_nodes else "")
            out.print(f"  {r.profile}: mixed precision kept {kept} — {escape(mp.why)}; "
                      f"cost {mp.size_cost_bytes / 1e3:+.1f} kB, {mp.latency_cost_ms:+.2f} ms", highlight=False)


@app.command()
def bundle(
    model: Annotated[Path, typer.Argument(help="Source model: .onnx (external data allowed) or PyTorch .pt2.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="The bundle to write (.zip).")],
    signing_key: Annotated[Path, typer.Option("--signing-key", help="The fleet's Ed25519 private key (PEM).")],
    ios: Annotated[str, typer.Option("--ios", help="iOS profile id or .toml path.")] = "ios-a15",
    android: Annotated[str, typer.Option("--android", help="Android profile id or .toml path.")] = "android-arm64",
    name: Annotated[str | None, typer.Option(help="Model name in the bundle (default: the file's stem).")] = None,
    model_version: Annotated[str, typer.Option(help="Model version recorded in the manifest.")] = "1.0.0",
    labels: Annotated[Path | None, typer.Option(help="Class labels, one per line.")] = None,
    calib: CalibOpt = None,
    eval_data: EvalOpt = None,
    eval_fraction: EvalFractionOpt = 0.25,
    synthetic_calibration: SyntheticOpt = 0,
    input_shape: InputShapeOpt = [],  # noqa: B006 - typer reads the default
    image_size: ImageSizeOpt = None,
    layout: LayoutOpt = "NCHW",
    mean: MeanOpt = "0,0,0",
    std: StdOpt = "1,1,1",
    channel_order: ChannelOrderOpt = "RGB",
    latency_runs: Annotated[int, typer.Option(help="Timed runs per model for the latency figures.")] = 30,
    as_json: Annotated[bool, typer.Option("--json", help="Print the manifest as JSON.")] = False,
    debug: Annotated[bool, typer.Option(help="Show tracebacks and library logs.")] = False,
) -> None:
    """Build a signed app bundle: Core ML for iOS + TFLite for Android, labels, reports, signed manifest."""
    logging.basicConfig(level=logging.INFO if debug else logging.ERROR)
    if not debug:
        logging.getLogger().setLevel(logging.ERROR)
    args = dict(locals())
    _guarded(debug, lambda: _bundle(**args))


def _bundle(*, model: Path, output: Path, signing_key: Path, ios: str, android: str, name: str | None,
            model_version: str, labels: Path | None, calib: Path | None, eval_data: Path | None,
            eval_fraction: float, synthetic_calibration: int, input_shape: list[str], image_size: str | None,
            layout: str, mean: str, std: str, channel_order: str, latency_runs: int, as_json: bool,
            debug: bool) -> int:
    from converters.bundle import BundleError, Platform, manifest_for, write_bundle
    from converters.pipeline import ARTIFACT_NAMES, ConvertOptions
    from converters.report import library_versions, summary_rows
    from firmware_profiles import ArtifactFormat
    from fleet_protocol.errors import MalformedError
    from fleet_protocol.keys import signer_from_pem

    prep = _check_data_options(calib, synthetic_calibration, eval_fraction, image_size, layout, mean, std,
                               channel_order)
    name = name or model.stem
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", name):
        raise typer.BadParameter(f"--name {name!r}: letters, digits, '.', '_' and '-' only (it names files)")
    try:
        signer = signer_from_pem(signing_key.read_bytes())
    except (OSError, MalformedError) as e:
        raise typer.BadParameter(f"--signing-key {signing_key}: {e}") from e
    label_list = _read_labels(labels) if labels else []
    wanted = [("ios", load_profile(ios), ArtifactFormat.COREML_INT8),
              ("android", load_profile(android), ArtifactFormat.TFLITE_INT8)]
    for key, p, fmt in wanted:
        if fmt not in {a.format for a in p.artifacts}:
            raise typer.BadParameter(f"--{key} {p.id}: the profile declares no {fmt.value} artifact")
    with tempfile.TemporaryDirectory(prefix="fleet-bundle-") as tmp, _progress(as_json) as step:
        work = Path(tmp)
        options = ConvertOptions(latency_runs=latency_runs, model_name=name, model_version=model_version,
                                 labels=tuple(label_list))
        converter = _converter(work / "work", step, model=model, calib=calib, eval_data=eval_data,
                               eval_fraction=eval_fraction, synthetic_calibration=synthetic_calibration,
                               input_shape=input_shape, prep=prep, options=options)
        platforms = []
        for key, p, fmt in wanted:
            step(f"{key}: {p.id}")
            report = next(r for r in converter.convert(p, work / "out") if r.format == fmt.value)
            platforms.append(Platform(key, report, work / "out" / p.id / ARTIFACT_NAMES[fmt]))
        step("signing the bundle")
        try:
            manifest, members = manifest_for(name, model_version, platforms, labels=label_list, prep=prep,
                                             converter_versions=library_versions())
        except BundleError as e:
            _print_summary([pl.report for pl in platforms], summary_rows([pl.report for pl in platforms]), output)
            raise _fail(str(e), EXIT_REFUSED) from e
        digest = write_bundle(output, manifest, members, signer)
    if as_json:
        print(json.dumps(manifest, indent=2))
    else:
        _print_summary([pl.report for pl in platforms], summary_rows([pl.report for pl in platforms]), output)
        out.print(f"bundle {output} ({output.stat().st_size / 1e6:.2f} MB, sha256 {digest}) signed by key "
                  f"{signer.public_key.keyid[:16]}…", highlight=False)
    return EXIT_OK


def _read_labels(path: Path) -> list[str]:
    try:
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as e:
        raise typer.BadParameter(f"--labels {path}: {e}") from e
    labels = [ln for ln in lines if ln]
    if not labels:
        raise typer.BadParameter(f"--labels {path}: no labels (one per line)")
    return labels


@app.command("verify-bundle")
def verify_bundle_cmd(
    path: Annotated[Path, typer.Argument(help="The bundle (.zip).")],
    public_key: Annotated[list[Path], typer.Option("--public-key", help="A trusted Ed25519 public key (PEM); "
                                                   "repeatable.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the verified manifest as JSON.")] = False,
) -> None:
    """Verify a bundle: signature by a trusted key, every member's hash, nothing unlisted."""
    from converters.bundle import verify_bundle
    from fleet_protocol.errors import MalformedError
    from fleet_protocol.keys import key_from_public_pem

    def body() -> int:
        try:
            keys = [key_from_public_pem(p.read_bytes()) for p in public_key]
        except (OSError, MalformedError) as e:
            raise typer.BadParameter(f"--public-key: {e}") from e
        manifest = verify_bundle(path, keys)
        if as_json:
            print(json.dumps(manifest, indent=2))
        else:
            m = manifest["model"]
            out.print(f"[green]verified[/] {path}: {m['name']} {m['version']}, {len(manifest['files'])} files",
                      highlight=False)
            for key, entry in manifest["platforms"].items():
                out.print(f"  {key}: {entry['artifact']} ({entry['format']}, {entry['profile']}) "
                          f"sha256 {entry['sha256'][:16]}…", highlight=False)
        return EXIT_OK

    _guarded(False, body)


@app.command()
def keygen(
    output: Annotated[Path, typer.Option("-o", "--output", help="Folder for fleet-signing.pem and .pub.pem.")],
) -> None:
    """Create an Ed25519 signing key pair for bundles (the private key is written with 0600 permissions)."""
    from fleet_protocol.keys import generate_signer, public_pem, signer_to_pem

    output.mkdir(parents=True, exist_ok=True)
    private, public = output / "fleet-signing.pem", output / "fleet-signing.pub.pem"
    if private.exists():
        raise _fail(f"{private} exists; refusing to overwrite a signing key", EXIT_USAGE)
    signer = generate_signer()
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(signer_to_pem(signer))
    public.write_bytes(public_pem(signer))
    out.print(f"wrote {private} (keep it secret) and {public}; key id {signer.public_key.keyid}", highlight=False)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
