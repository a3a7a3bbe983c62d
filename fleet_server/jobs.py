"""Conversion jobs: run in a separate process pool, so the API stays responsive; the converting itself runs in a
sandboxed child (fleet_server/sandbox.py), so nothing an upload makes a converter do reaches the server's keys.

The pool worker opens its own database engine and artifact store, marks the job running, copies the version's
uploads into a sandbox and starts the child there. The child reads only those copies and writes only into its work
folder: per requested profile the artifact (a Core ML package zipped with sorted members and fixed timestamps), its
report and golden probe, with progress lines on its pipe. The worker relays the progress to the job row, checks the
child's list of outputs, stores each file in the content-addressed store, and marks the job succeeded or failed with
the reason. The child never sees the database, the store or the keys.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import time
import traceback
import zipfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import IO, Annotated, Literal

from pydantic import BaseModel, Field, ValidationError
from sqlmodel import Session

from fleet_server.artifacts import StoreConfig, open_store
from fleet_server.db import make_engine
from fleet_server.models import ConversionJob, ConvertedArtifact, JobStatus, ModelVersion, utcnow
from fleet_server.sandbox import Sandbox, SandboxCancelledError, SandboxConfig, SandboxError, out_of_memory

log = logging.getLogger(__name__)
PROGRESS_EVERY_S = 0.5
JOB_TIMEOUT_S = 3600.0  # the default of settings.sandbox_job_timeout_s


class ConversionFailedError(Exception):
    """The converter refused the version's uploads (the child's one-line reason), or its outputs are unusable."""


class JobRunner:
    """A lazily started process pool (spawned, never forked from a threaded server)."""

    def __init__(self, database_url: str, data_dir: Path, workers: int = 1, sandbox: SandboxConfig | None = None,
                 store: StoreConfig | None = None):
        self.database_url, self.data_dir, self.workers = database_url, data_dir, workers
        self.sandbox = sandbox or SandboxConfig.for_server(Path(data_dir), database_url, timeout_s=JOB_TIMEOUT_S)
        self.store = store or StoreConfig(local_root=str(Path(data_dir) / "artifacts"))
        self._pool: ProcessPoolExecutor | None = None

    def submit(self, job_id: int) -> None:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))
        # The outcome lands in the job row.
        self._pool.submit(run_job, job_id, self.database_url, str(self.data_dir), self.sandbox, self.store)

    def cancel(self, job_id: int) -> None:
        """Nothing to do beyond the job's row (marked cancelled by the caller): a waiting job sees it when it
        starts, a running one within a second, and its sandboxed child is killed."""

    def check(self) -> None:
        """Nothing waits for a worker that may never come: the pool builds every profile."""

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


def _zip_dir(folder: Path, out: Path) -> None:
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for p in sorted(q for q in folder.rglob("*") if q.is_file()):
            info = zipfile.ZipInfo(f"{folder.name}/{p.relative_to(folder).as_posix()}", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(info, p.read_bytes())


def run_job(job_id: int, database_url: str, data_dir: str, sandbox: SandboxConfig | None = None,
            store_config: StoreConfig | None = None) -> str:
    """Runs in the worker process. Never raises: the outcome is written to the job row."""
    engine = make_engine(database_url)
    store = open_store(store_config or StoreConfig(local_root=str(Path(data_dir) / "artifacts")))
    sandbox = sandbox or SandboxConfig.for_server(Path(data_dir), database_url, timeout_s=JOB_TIMEOUT_S)
    lines: list[str] = []
    last = [0.0]

    def update(**fields) -> None:
        with Session(engine) as s:
            job = s.get(ConversionJob, job_id)
            for k, v in fields.items():
                setattr(job, k, v)
            job.log = "\n".join(lines)[-20000:]
            s.add(job)
            s.commit()

    def progress(message: str) -> None:
        lines.append(f"{time.strftime('%H:%M:%S')} {message}")
        if time.monotonic() - last[0] > PROGRESS_EVERY_S:
            last[0] = time.monotonic()
            update(progress=message[:500])

    def cancelled() -> bool:
        with Session(engine) as s:
            return s.get(ConversionJob, job_id).status == JobStatus.CANCELLED

    with Session(engine) as s:
        job = s.get(ConversionJob, job_id)
        mv = s.get(ModelVersion, job.model_version_id)
        profiles, version, status = list(job.profiles), mv.model_copy(), job.status
    if status == JobStatus.CANCELLED:  # cancelled while it waited for a pool process
        engine.dispose()
        return "cancelled"
    update(status=JobStatus.RUNNING, started_at=utcnow(), progress="starting")
    try:
        results = _convert_sandboxed(version, profiles, store, sandbox, progress, cancelled)
        with Session(engine) as s:
            for r in results:
                s.add(ConvertedArtifact(job_id=job_id, model_version_id=version.id, **r))
            s.commit()
        done = sum(r["status"] == "shippable" for r in results)
        lines.append(f"done: {done} of {len(results)} artifact(s) shippable")
        update(status=JobStatus.SUCCEEDED, finished_at=utcnow(), progress=lines[-1])
        return "succeeded"
    except SandboxCancelledError:
        lines.append("cancelled: the conversion was stopped")
        update(finished_at=utcnow(), progress="cancelled")
        return "cancelled"
    except Exception as e:  # bad input, a converter failure or a sandbox limit: the job says why
        known = isinstance(e, (ConversionFailedError, SandboxError))
        message = str(e) if known else f"{type(e).__name__}: {e}"
        lines.append(f"failed: {message}")
        if not known:
            lines.append(traceback.format_exc()[-3000:])
        update(status=JobStatus.FAILED, finished_at=utcnow(), error=message[:2000], progress="failed")
        return "failed"
    finally:
        engine.dispose()


def _convert_sandboxed(mv: ModelVersion, profiles: list[str], store, sandbox: SandboxConfig, progress,
                       cancelled=None) -> list[dict]:
    """The worker's side: the uploads into a sandbox, the conversion in its child, the outputs into the store."""
    with Sandbox(sandbox, "conversion") as box:
        args = {"source": box.add_stream(store.open(mv.source_sha256), f"source.{mv.source_format}"),
                "calibration": box.add_stream(store.open(mv.calibration_sha256), "calibration.npz"),
                "evaluation": (box.add_stream(store.open(mv.evaluation_sha256), "evaluation.npz")
                               if mv.evaluation_sha256 else None),
                "profiles": profiles, "name": mv.name, "version": mv.version}
        answer = box.run("fleet_server.jobs:convert_in_sandbox", args, on_progress=progress, cancelled=cancelled)
        if isinstance(answer, dict) and isinstance(answer.get("error"), str):
            raise ConversionFailedError(answer["error"])
        try:
            outputs = _Outputs.model_validate(answer).artifacts
        except ValidationError as e:
            raise ConversionFailedError("the conversion gave a malformed list of outputs") from e
        if any(o.profile not in profiles for o in outputs):
            raise ConversionFailedError("the conversion gave outputs for profiles it was not asked for")
        return [_register(box, store, o) for o in outputs]


Relative = Annotated[str, Field(max_length=300)]


class _Output(BaseModel):
    """One artifact as the child reports it. Checked, since the child is not trusted; paths are re-opened safely."""

    profile: str = Field(max_length=64)
    format: str = Field(max_length=32)
    status: Literal["shippable", "refused", "failed"]
    reasons: list[Annotated[str, Field(max_length=4000)]] = Field(max_length=200)
    fidelity: Annotated[float, Field(allow_inf_nan=False)] | None = None
    artifact: Relative | None = None
    report: Relative
    probe: Relative | None = None


class _Outputs(BaseModel):
    artifacts: list[_Output] = Field(max_length=1000)


def _register(box: Sandbox, store, out: _Output) -> dict:
    sha = size = probe_sha = None
    if out.artifact is not None and out.status == "shippable":
        sha, size = _put(store, box.open_output(out.artifact))
        if out.probe is not None:
            probe_sha, _ = _put(store, box.open_output(out.probe))
    report_sha, _ = _put(store, box.open_output(out.report))
    return {"profile": out.profile, "format": out.format, "status": out.status, "artifact_sha256": sha,
            "size": size, "report_sha256": report_sha, "reasons": out.reasons, "probe_sha256": probe_sha,
            "fidelity": out.fidelity}


def convert_in_sandbox(args: dict, progress) -> dict:
    """The sandboxed child's side: converts the copies in its work folder (its cwd) and writes every output under
    it; returns what it made, as paths relative to the work folder, or the converter's one-line reason."""
    from converters.errors import ConvertError

    try:
        return {"artifacts": _convert(args, progress)}
    except ConvertError as e:
        if out_of_memory(e):
            raise MemoryError from e
        return {"error": str(e)}


def _convert(args: dict, progress) -> list[dict]:
    from converters.calibration import load_dataset, split
    from converters.pipeline import ARTIFACT_NAMES, Converter, ConvertOptions
    from converters.probe import PROBED_SUFFIXES, golden_probe
    from converters.source import load_source
    from firmware_profiles import load_profile

    progress("loading model")
    here = Path.cwd()  # the work folder; absolute, since the converters' own workers start elsewhere
    source = load_source(here / args["source"], here / "work")
    data = load_dataset(here / args["calibration"], source.inputs)
    if args["evaluation"]:
        calibration, evaluation = data, load_dataset(here / args["evaluation"], source.inputs)
    else:
        calibration, evaluation = split(data, 0.25)
    converter = Converter(source, calibration, evaluation, here / "work",
                          ConvertOptions(latency_runs=20, model_name=args["name"], model_version=args["version"]),
                          progress=progress)
    results, made = [], here / "results"
    made.mkdir()
    for pid in args["profiles"]:
        progress(f"{pid}: converting")
        for report in converter.convert(load_profile(pid), here / "out"):
            fmt = next(f for f in ARTIFACT_NAMES if f.value == report.format)
            artifact = here / "out" / pid / ARTIFACT_NAMES[fmt]
            kept = probe = None
            if report.shippable and artifact.exists():
                if artifact.suffix in PROBED_SUFFIXES and evaluation.samples:
                    probe = made / f"{pid}-{fmt.value}.probe.npz"
                    probe.write_bytes(golden_probe(artifact, evaluation.samples[0]))
                kept = artifact
                if artifact.is_dir():
                    kept = made / f"{pid}-{fmt.value}.zip"
                    _zip_dir(artifact, kept)
            report_file = made / f"{pid}-{fmt.value}.report.json"
            report_file.write_text(report.model_dump_json(indent=2))
            fidelity = min((o.cosine for o in report.fidelity), default=None)
            results.append({"profile": pid, "format": report.format, "status": report.status.value,
                            "reasons": report.reasons, "fidelity": fidelity, "report": _relative(report_file),
                            "artifact": kept and _relative(kept), "probe": probe and _relative(probe)})
            progress(f"{pid} {report.format}: {report.status.value}")
    return results


def _relative(path: Path) -> str:
    return path.relative_to(Path.cwd()).as_posix()


def _put(store, source: IO[bytes]) -> tuple[str, int]:
    async def chunks():
        with source:
            while block := source.read(1 << 20):
                yield block

    return asyncio.run(store.put_stream(chunks(), max_bytes=1 << 40))
