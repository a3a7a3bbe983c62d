"""Conversion jobs: ``converters/`` run in a separate process pool, so the API stays responsive.

The worker process opens its own database engine and artifact store, marks the job running, converts the model for
each requested profile (progress and log lines go to the job row as it works), stores every artifact and report in
the content-addressed store, and marks the job succeeded or failed with the reason. A Core ML package (a directory)
is stored as a zip with sorted members and fixed timestamps.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import shutil
import tempfile
import time
import traceback
import zipfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from sqlmodel import Session

from fleet_server.db import make_engine
from fleet_server.models import ConversionJob, ConvertedArtifact, JobStatus, ModelVersion, utcnow

log = logging.getLogger(__name__)
PROGRESS_EVERY_S = 0.5


class JobRunner:
    """A lazily started process pool (spawned, never forked from a threaded server)."""

    def __init__(self, database_url: str, data_dir: Path, workers: int = 1):
        self.database_url, self.data_dir, self.workers = database_url, data_dir, workers
        self._pool: ProcessPoolExecutor | None = None

    def submit(self, job_id: int) -> None:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))
        self._pool.submit(run_job, job_id, self.database_url, str(self.data_dir))  # the outcome lands in the job row

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


def run_job(job_id: int, database_url: str, data_dir: str) -> str:
    """Runs in the worker process. Never raises: the outcome is written to the job row."""
    from fleet_server.artifacts import LocalArtifactStore

    engine = make_engine(database_url)
    store = LocalArtifactStore(Path(data_dir) / "artifacts")
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

    with Session(engine) as s:
        job = s.get(ConversionJob, job_id)
        mv = s.get(ModelVersion, job.model_version_id)
        profiles, version = list(job.profiles), mv.model_copy()
    update(status=JobStatus.RUNNING, started_at=utcnow(), progress="starting")
    work = Path(tempfile.mkdtemp(prefix=f"fleet-job{job_id}-"))
    try:
        results = _convert(version, profiles, store, work, progress)
        with Session(engine) as s:
            for r in results:
                s.add(ConvertedArtifact(job_id=job_id, model_version_id=version.id, **r))
            s.commit()
        done = sum(r["status"] == "shippable" for r in results)
        lines.append(f"done: {done} of {len(results)} artifact(s) shippable")
        update(status=JobStatus.SUCCEEDED, finished_at=utcnow(), progress=lines[-1])
        return "succeeded"
    except Exception as e:  # bad input or a converter failure: the job says why
        from converters.errors import ConvertError

        message = str(e) if isinstance(e, ConvertError) else f"{type(e).__name__}: {e}"
        lines.append(f"failed: {message}")
        if not isinstance(e, ConvertError):
            lines.append(traceback.format_exc()[-3000:])
        update(status=JobStatus.FAILED, finished_at=utcnow(), error=message[:2000], progress="failed")
        return "failed"
    finally:
        shutil.rmtree(work, ignore_errors=True)
        engine.dispose()


def _convert(mv: ModelVersion, profiles: list[str], store, work: Path, progress) -> list[dict]:
    from converters.calibration import load_dataset, split
    from converters.pipeline import ARTIFACT_NAMES, Converter, ConvertOptions
    from converters.source import load_source
    from firmware_profiles import load_profile

    source_path = work / f"source.{mv.source_format}"
    shutil.copyfile(store.path(mv.source_sha256), source_path)
    calib_path = work / "calibration.npz"
    shutil.copyfile(store.path(mv.calibration_sha256), calib_path)
    progress("loading model")
    source = load_source(source_path, work / "work")
    data = load_dataset(calib_path, source.inputs)
    if mv.evaluation_sha256:
        eval_path = work / "evaluation.npz"
        shutil.copyfile(store.path(mv.evaluation_sha256), eval_path)
        calibration, evaluation = data, load_dataset(eval_path, source.inputs)
    else:
        calibration, evaluation = split(data, 0.25)
    converter = Converter(source, calibration, evaluation, work / "work",
                          ConvertOptions(latency_runs=20, model_name=mv.name, model_version=mv.version),
                          progress=progress)
    results = []
    for pid in profiles:
        progress(f"{pid}: converting")
        for report in converter.convert(load_profile(pid), work / "out"):
            fmt = next(f for f in ARTIFACT_NAMES if f.value == report.format)
            artifact = work / "out" / pid / ARTIFACT_NAMES[fmt]
            sha = size = probe_sha = None
            if report.shippable and artifact.exists():
                if artifact.suffix in (".onnx", ".tflite") and evaluation.samples:
                    probe_file = work / f"{pid}-{fmt.value}.probe.npz"
                    probe_file.write_bytes(golden_probe(artifact, evaluation.samples[0]))
                    probe_sha, _ = _put_file(store, probe_file)
                if artifact.is_dir():
                    zipped = work / f"{pid}-{fmt.value}.zip"
                    _zip_dir(artifact, zipped)
                    artifact = zipped
                sha, size = _put_file(store, artifact)
            report_file = work / f"{pid}-{fmt.value}.report.json"
            report_file.write_text(report.model_dump_json(indent=2))
            report_sha, _ = _put_file(store, report_file)
            results.append({"profile": pid, "format": report.format, "status": report.status.value,
                            "artifact_sha256": sha, "size": size, "report_sha256": report_sha,
                            "reasons": report.reasons, "probe_sha256": probe_sha,
                            "fidelity": min((o.cosine for o in report.fidelity), default=None)})
            progress(f"{pid} {report.format}: {report.status.value}")
    return results


def golden_probe(artifact: Path, sample: dict) -> bytes:
    """The probe a device runs before switching: one evaluation sample and what this very artifact answers, computed
    with the agent's own runtime wrapper (so the device compares like with like)."""
    import io

    import numpy as np

    from agent.runtimes import check_feeds, load

    model = load(artifact, threads=1)
    outputs = model.run(check_feeds(model, sample))
    buf = io.BytesIO()
    np.savez(buf, **{f"in/{k}": v for k, v in sample.items()}, **{f"out/{k}": v for k, v in outputs.items()})
    return buf.getvalue()


def _put_file(store, path: Path) -> tuple[str, int]:
    async def chunks():
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                yield block

    return asyncio.run(store.put_stream(chunks(), max_bytes=1 << 40))
