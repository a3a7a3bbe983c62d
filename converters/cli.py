"""``fleet-convert``: one source model in, one INT8 artifact per hardware profile out, each with its report.

Exit codes:
  0  every artifact built is shippable (formats not built yet are listed, not failed)
  1  internal error (a bug: please report it with the traceback from --debug)
  2  usage error: bad option, unknown profile
  3  bad input: not a model, truncated model, unsupported ops, calibration data that does not fit
  4  at least one artifact was refused by the fidelity gate or failed to quantize
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
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
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    return typer.Exit(code)


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
    calib: Annotated[Path | None, typer.Option("--calib", help=".npz, .npy, folder of .npy or of images.")]
    = None,
    eval_data: Annotated[Path | None, typer.Option("--eval", help="Separate evaluation data (same formats).")]
    = None,
    eval_fraction: Annotated[float, typer.Option(help="Share of --calib held out for evaluation without --eval.")]
    = 0.25,
    synthetic_calibration: Annotated[int, typer.Option(
        "--synthetic-calibration", help="Calibrate on N random samples (marked SYNTHETIC in every report).")] = 0,
    input_shape: Annotated[list[str], typer.Option("--input-shape", help="Pin a dynamic input: name=1,3,224,224.")]
    = [],  # noqa: B006
    image_size: Annotated[str | None, typer.Option(help="Image folders: HEIGHT,WIDTH.")] = None,
    layout: Annotated[str, typer.Option(help="Image folders: NCHW or NHWC.")] = "NCHW",
    mean: Annotated[str, typer.Option(help="Image folders: per-channel mean after scaling to 0..1.")] = "0,0,0",
    std: Annotated[str, typer.Option(help="Image folders: per-channel std after scaling to 0..1.")] = "1,1,1",
    channel_order: Annotated[str, typer.Option(help="Image folders: RGB or BGR.")] = "RGB",
    output_kind: Annotated[list[str], typer.Option(
        "--output-kind", help="Override how an output is judged: name=classification|sequence|regression.")]
    = [],  # noqa: B006
    latency_runs: Annotated[int, typer.Option(help="Timed runs per model for the latency figures.")] = 30,
    as_json: Annotated[bool, typer.Option("--json", help="Print the reports as JSON instead of a table.")] = False,
    debug: Annotated[bool, typer.Option(help="Show tracebacks and library logs.")] = False,
) -> None:
    """Quantize MODEL for each profile, measure fidelity against FP32, and refuse what falls below the floor."""
    logging.basicConfig(level=logging.INFO if debug else logging.ERROR)
    if not debug:
        logging.getLogger().setLevel(logging.ERROR)  # ONNX Runtime's quantizer logs advice at WARNING
    try:
        code = _convert(**locals())
    except typer.Exit:
        raise
    except typer.BadParameter as e:
        raise _fail(str(e), EXIT_USAGE) from e
    except ProfileError as e:
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
             output_kind: list[str], latency_runs: int, as_json: bool, debug: bool) -> int:
    from converters.calibration import ImagePrep, load_dataset, split, synthetic_dataset
    from converters.fidelity import OutputKind
    from converters.pipeline import Converter, ConvertOptions
    from converters.report import Status, summary_rows
    from converters.source import load_source

    if all_profiles == bool(profile):
        raise typer.BadParameter("give --profile (one or more) or --all-profiles")
    if (calib is None) == (synthetic_calibration == 0):
        raise typer.BadParameter("give --calib DATA, or --synthetic-calibration N to calibrate on random data")
    if not 0.0 < eval_fraction < 1.0:
        raise typer.BadParameter("--eval-fraction must be between 0 and 1")
    if layout not in ("NCHW", "NHWC") or channel_order not in ("RGB", "BGR"):
        raise typer.BadParameter("--layout is NCHW or NHWC; --channel-order is RGB or BGR")
    kinds = {}
    for item in output_kind:
        name, _, kind = item.partition("=")
        try:
            kinds[name] = OutputKind(kind)
        except ValueError:
            raise typer.BadParameter(f"--output-kind {item!r}: kind is classification, sequence or regression")\
                from None
    targets = [load_profile(p) for p in (builtin_profile_ids() if all_profiles else profile)]
    prep = None
    if image_size:
        h, w = (int(x) for x in _floats(image_size, "--image-size"))
        prep = ImagePrep(h, w, layout, _floats(mean, "--mean"), _floats(std, "--std"), channel_order)  # type: ignore[arg-type]

    output.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fleet-convert-") as tmp, Progress(
            SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=err,
            transient=True, disable=as_json or not err.is_terminal) as progress:
        task = progress.add_task("loading model", total=None)

        def step(message: str) -> None:
            progress.update(task, description=message)

        work = Path(tmp)
        source = load_source(model, work, input_shapes=_parse_shapes(input_shape))
        step("reading calibration data")
        data = synthetic_dataset(source.inputs, synthetic_calibration) if synthetic_calibration else \
            load_dataset(calib, source.inputs, image_prep=prep)  # type: ignore[arg-type]
        if eval_data is not None:
            calibration, evaluation = data, load_dataset(eval_data, source.inputs, image_prep=prep)
        else:
            calibration, evaluation = split(data, eval_fraction)
        converter = Converter(source, calibration, evaluation, work,
                              ConvertOptions(latency_runs=latency_runs, output_kinds=kinds), progress=step)
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
    colors = {"shippable": "green", "refused": "red", "failed": "red", "not_built": "yellow"}
    table = Table(title=f"fleet-convert → {output}")
    for col in rows[0] if rows else []:
        table.add_column(col, overflow="fold")
    for row in rows:
        table.add_row(*[f"[{colors[v]}]{v}[/]" if k == "status" else v for k, v in row.items()])
    out.print(table)
    for r in reports:
        for reason in r.reasons:
            out.print(f"  {r.profile} {r.format} {r.status.value}: {reason}", highlight=False)
    notes = sorted({n for r in reports for n in r.notes})
    for n in notes:
        out.print(f"  note: {n}", highlight=False)
    for r in reports:
        if r.mixed_precision:
            mp = r.mixed_precision
            out.print(f"  {r.profile}: mixed precision kept {len(mp.float_nodes)} node(s) in float — {mp.why}; "
                      f"cost {mp.size_cost_bytes / 1e3:+.1f} kB, {mp.latency_cost_ms:+.2f} ms", highlight=False)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
