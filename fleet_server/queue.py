"""Conversion jobs on a distributed job queue: procrastinate, in the server's own PostgreSQL.

Why procrastinate: the server already runs on PostgreSQL past one machine, so the queue needs no new service (no
Redis or RabbitMQ to run, back up and secure); jobs are rows, enqueued in the same database as the job they belong
to; workers pick work up at once through LISTEN/NOTIFY, send heartbeats, and a job whose worker stopped beating is
found by one query. The embedded default (settings.job_queue = "local": SQLite, one machine) keeps the in-process
pool of fleet_server/jobs.py.

A conversion job becomes one *part* per profile (``ConversionPart``), deferred to the queue ``convert-<profile>``.
A worker (`fleet-server worker`, on any machine with the convert extra) works out what it can build — the artifact
formats whose toolchains it has, "coreml-predict" on macOS, "tensorrt" where TensorRT is installed — registers that
with a heartbeat (``ConversionWorker``) and listens only on the queues of the profiles it can build (or those it is
told to take). A part that no live worker can build fails with that reason instead of waiting.

The part runs in the worker's sandboxed child like a local job (fleet_server/jobs.py); progress and log lines go to
the job row the API and console show. Its artifacts are registered with the part's move to succeeded in one
transaction under the part's row lock, so a part that runs twice registers one set. Failures:

- the converter's own refusal or an unusable model (ConversionFailedError, a sandbox limit): final, not retried;
- anything else (the database or the object store away, a lost connection): retried with exponential backoff up to
  ``job_attempts`` tries;
- a worker killed mid-part: its procrastinate heartbeat stops, and after ``worker_stall_s`` (the visibility timeout)
  any other worker's sweep sends the part back to its queue;
- cancelling the job (POST /v1/jobs/{id}/cancel): queued parts are cancelled in the queue, and a running part's
  worker sees it within a second and kills its sandboxed child.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Iterable
from datetime import UTC, datetime

from sqlalchemy import delete, func, update
from sqlalchemy.engine import make_url
from sqlmodel import Session, select

from fleet_server.models import (
    ConversionJob,
    ConversionPart,
    ConversionWorker,
    ConvertedArtifact,
    JobStatus,
    ModelVersion,
    utcnow,
)

log = logging.getLogger(__name__)

TASK = "fleet_server.queue.convert_part"
QUEUE_PREFIX = "convert-"
FINAL = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)
LOG_FLUSH_S = 0.5
SCHEMA_LOCK = 0x65F1_0001  # pg_advisory_lock key: one process applies procrastinate's schema


class TransientError(Exception):
    """A part failed for a reason that may pass (an outage): procrastinate retries it with backoff."""


def queue_name(profile: str) -> str:
    return QUEUE_PREFIX + profile


def conninfo(database_url: str) -> str:
    """libpq's form of the server's SQLAlchemy URL (procrastinate speaks psycopg directly)."""
    url = make_url(database_url)
    if url.get_backend_name() != "postgresql":
        raise ValueError("job_queue = 'procrastinate' needs a PostgreSQL database_url (the queue lives there)")
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


def ensure_schema(database_url: str) -> bool:
    """Apply procrastinate's schema once (True when this call applied it); concurrent starters wait on a lock."""
    import psycopg
    from procrastinate.schema import SchemaManager

    with psycopg.connect(conninfo(database_url), autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (SCHEMA_LOCK,))
        try:
            if conn.execute("SELECT to_regclass('procrastinate_jobs')").fetchone()[0] is not None:
                return False
            conn.execute(SchemaManager.get_schema())
            return True
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (SCHEMA_LOCK,))


# ------------------------------------------------------------------------------------------- what workers can do


def capabilities() -> tuple[list[str], list[str]]:
    """(artifact formats this machine can build, flags): by the toolchains importable here."""
    def have(name: str) -> bool:
        return importlib.util.find_spec(name) is not None

    formats = []
    if have("onnxruntime") and have("onnx") and have("converters"):
        formats.append("onnx-int8")
        if have("tensorflow") and have("onnx2tf"):
            formats.append("tflite-int8")
        if have("coremltools"):
            formats.append("coreml-int8")
    flags = []
    if sys.platform == "darwin" and have("coremltools"):
        flags.append("coreml-predict")  # Core ML runs here: the gate measures the package itself, not a simulation
    if have("tensorrt"):
        flags.append("tensorrt")
    return formats, flags


def needs(profile: str) -> set[str]:
    from firmware_profiles import load_profile

    return {f.value for f in load_profile(profile).formats}


def buildable(formats: Iterable[str], only: Iterable[str] | None = None) -> list[str]:
    """The built-in profiles whose every artifact format is in ``formats`` (restricted to ``only`` when given)."""
    from firmware_profiles import builtin_profile_ids

    wanted = set(only) if only else None
    have = set(formats)
    return [p for p in builtin_profile_ids() if (wanted is None or p in wanted) and needs(p) <= have]


def live_workers(session: Session, stall_s: float) -> list[ConversionWorker]:
    cutoff = time.time() - stall_s
    return list(session.exec(select(ConversionWorker).where(ConversionWorker.heartbeat_at >= cutoff)).all())


def unbuildable_reason(profile: str, workers: list[ConversionWorker]) -> str | None:
    if any(profile in w.profiles for w in workers):
        return None
    seen = "; ".join(f"{w.name} ({', '.join(w.profiles) or 'nothing'})" for w in workers) or "none"
    return (f"no live worker can build {profile} (it needs {', '.join(sorted(needs(profile)))}); "
            f"live workers and their profiles: {seen}")


# ------------------------------------------------------------------------------------------- the job and its parts


def settle(session: Session, job_id: int) -> None:
    """The job's status from its parts (the caller commits); a cancelled job stays cancelled."""
    job = session.get(ConversionJob, job_id, with_for_update=True)
    parts = session.exec(select(ConversionPart).where(ConversionPart.job_id == job_id)).all()
    if job is None or job.status == JobStatus.CANCELLED:
        return
    if any(p.status not in FINAL for p in parts):
        if any(p.status == JobStatus.RUNNING for p in parts) and job.status == JobStatus.QUEUED:
            job.status, job.started_at = JobStatus.RUNNING, job.started_at or utcnow()
        session.add(job)
        return
    failed = [p for p in parts if p.status != JobStatus.SUCCEEDED]
    job.status = JobStatus.FAILED if failed else JobStatus.SUCCEEDED
    job.error = "; ".join(f"{p.profile}: {p.error or p.status.value}" for p in failed)[:2000]
    made = session.exec(select(func.count()).select_from(ConvertedArtifact)
                        .where(ConvertedArtifact.job_id == job_id,
                               ConvertedArtifact.status == "shippable")).one()
    job.progress = (f"failed: {job.error}" if failed else f"done: {made} shippable artifact(s)")[:500]
    job.finished_at = utcnow()
    session.add(job)


def append_log(engine, job_id: int, lines: list[str], progress: str | None = None) -> None:
    """Lines onto the job's log in one statement (parts of one job write concurrently from several workers)."""
    if not lines and progress is None:
        return
    values: dict = {}
    if lines:
        values["log"] = func.right(ConversionJob.log + "\n" + "\n".join(lines), 20000)
    if progress is not None:
        values["progress"] = progress[:500]
    with Session(engine) as s:
        s.execute(update(ConversionJob).where(ConversionJob.id == job_id).values(**values))  # type: ignore[arg-type]
        s.commit()


def fail_unbuildable(session: Session, stall_s: float, *, grace_s: float | None = None) -> int:
    """Queued parts that no live worker can build fail with that reason, once they have waited ``grace_s`` (a
    worker may be starting). The number failed; the caller commits."""
    grace = stall_s if grace_s is None else grace_s
    waiting = session.exec(select(ConversionPart).where(ConversionPart.status == JobStatus.QUEUED)).all()
    if not waiting:
        return 0
    workers = live_workers(session, stall_s)
    failed = 0
    for part in waiting:
        job = session.get(ConversionJob, part.job_id)
        waited = (utcnow() - _aware(job.created_at)).total_seconds() if job else 0
        reason = unbuildable_reason(part.profile, workers)
        if reason is None or waited < grace:
            continue
        part.status, part.error, part.finished_at = JobStatus.FAILED, reason[:2000], utcnow()
        session.add(part)
        session.flush()
        settle(session, part.job_id)
        failed += 1
    return failed


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


class QueueRunner:
    """The API server's side: a job's parts into the queue, and their cancellation. Same interface as
    fleet_server.jobs.JobRunner."""

    def __init__(self, settings, engine):
        import procrastinate

        self.settings, self.engine = settings, engine
        ensure_schema(settings.database_url)
        self.app = procrastinate.App(connector=procrastinate.SyncPsycopgConnector(
            conninfo=conninfo(settings.database_url), min_size=1, max_size=4))
        self._lock = threading.Lock()
        self._open = False

    def _app(self):
        with self._lock:
            if not self._open:
                self.app.open()
                self._open = True
        return self.app

    def submit(self, job_id: int) -> None:
        with Session(self.engine) as s:
            job = s.get(ConversionJob, job_id)
            workers = live_workers(s, self.settings.worker_stall_s)
            parts = []
            for profile in job.profiles:
                reason = unbuildable_reason(profile, workers)
                part = ConversionPart(job_id=job_id, profile=profile)
                if reason is not None:
                    part.status, part.error, part.finished_at = JobStatus.FAILED, reason[:2000], utcnow()
                s.add(part)
                parts.append(part)
            s.commit()
            for part in parts:
                s.refresh(part)
            todo = [(p.id, p.profile) for p in parts if p.status == JobStatus.QUEUED]
            unbuilt = [f"[{p.profile}] {p.error}" for p in parts if p.status == JobStatus.FAILED]
            settle(s, job_id)
            s.commit()
        for part_id, profile in todo:
            queued = self._app().configure_task(TASK, queue=queue_name(profile)).defer(part_id=part_id)
            with Session(self.engine) as s:
                s.execute(update(ConversionPart).where(ConversionPart.id == part_id)  # type: ignore[arg-type]
                          .values(queue_job_id=queued))
                s.commit()
        if unbuilt:
            append_log(self.engine, job_id, unbuilt)

    def cancel(self, job_id: int) -> None:
        """The job is marked cancelled by the caller; its parts follow, queued ones leave the queue, and running
        ones are stopped by their workers (which look once a second)."""
        with Session(self.engine) as s:
            parts = s.exec(select(ConversionPart).where(ConversionPart.job_id == job_id,
                                                        ConversionPart.status.in_([JobStatus.QUEUED,  # type: ignore[attr-defined]
                                                                                   JobStatus.RUNNING]))).all()
            queued = [p.queue_job_id for p in parts if p.status == JobStatus.QUEUED and p.queue_job_id]
            for p in parts:
                if p.status == JobStatus.QUEUED:
                    p.status, p.finished_at = JobStatus.CANCELLED, utcnow()
                    s.add(p)
            s.commit()
        for qid in queued:
            with contextlib.suppress(Exception):  # already taken: the worker sees the cancelled job and stops
                self._app().job_manager.cancel_job_by_id(qid)

    def check(self) -> None:
        with Session(self.engine) as s:
            if fail_unbuildable(s, self.settings.worker_stall_s):
                s.commit()

    def shutdown(self) -> None:
        with self._lock:
            if self._open:
                self.app.close()
                self._open = False


# ------------------------------------------------------------------------------------------- the worker


class _Backoff:
    """procrastinate's retry strategy for parts: TransientError only, waiting ``first_s`` doubled per attempt."""

    def __init__(self, first_s: float):
        from procrastinate import BaseRetryStrategy

        base = first_s

        class Strategy(BaseRetryStrategy):
            def get_retry_decision(self, *, exception, job):
                from procrastinate import RetryDecision

                if not isinstance(exception, TransientError):
                    return None
                return RetryDecision(retry_in={"seconds": round(base * 2 ** job.attempts)})

        self.strategy = Strategy()


class Worker:
    """One `fleet-server worker` process: takes parts of the profiles it can build, one at a time per slot."""

    def __init__(self, settings, *, name: str | None = None, profiles: list[str] | None = None,
                 concurrency: int = 1):
        import procrastinate

        from fleet_server.artifacts import StoreConfig, open_store
        from fleet_server.db import make_engine
        from fleet_server.sandbox import SandboxConfig

        self.settings = settings
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        self.formats, self.flags = capabilities()
        self.profiles = buildable(self.formats, profiles)
        if profiles:
            missing = sorted(set(profiles) - set(self.profiles))
            if missing:
                raise ValueError(f"this machine cannot build {', '.join(missing)} (it builds {self.formats})")
        if not self.profiles:
            raise ValueError(f"this machine can build no profile (artifact formats here: {self.formats or 'none'})")
        self.concurrency = concurrency
        self.engine = make_engine(settings.database_url)
        self.store = open_store(StoreConfig.from_settings(settings))
        self.sandbox = SandboxConfig.from_settings(settings, timeout_s=settings.sandbox_job_timeout_s)
        ensure_schema(settings.database_url)
        self.app = procrastinate.App(connector=procrastinate.PsycopgConnector(
            conninfo=conninfo(settings.database_url)))
        self.app.task(name=TASK, pass_context=True, retry=_Backoff(settings.job_retry_wait_s).strategy)(
            self._task)
        self.current: dict[int, str] = {}
        self._stop = threading.Event()

    # -- registry and sweeps

    def beat(self) -> None:
        now = time.time()
        with Session(self.engine) as s:
            current = ", ".join(list(self.current.values()))[:200]  # written by the converting thread
            row = s.get(ConversionWorker, self.name)
            if row is None:
                row = ConversionWorker(name=self.name, host=socket.gethostname(), formats=self.formats,
                                       flags=self.flags, profiles=self.profiles, heartbeat_at=now)
            row.heartbeat_at, row.current = now, current
            s.add(row)
            s.execute(delete(ConversionWorker).where(  # type: ignore[arg-type]
                ConversionWorker.heartbeat_at < now - 20 * self.settings.worker_stall_s))
            s.commit()
            if fail_unbuildable(s, self.settings.worker_stall_s):
                s.commit()

    def unregister(self) -> None:
        with Session(self.engine) as s:
            s.execute(delete(ConversionWorker).where(ConversionWorker.name == self.name))  # type: ignore[arg-type]
            s.commit()

    async def _sweep(self) -> None:
        """Heartbeat, and parts whose worker stopped beating (killed, lost host) back to their queues."""
        while True:
            try:
                await asyncio.to_thread(self.beat)
                stalled = await self.app.job_manager.get_stalled_jobs(
                    task_name=TASK, seconds_since_heartbeat=self.settings.worker_stall_s)
                for job in stalled:
                    log.warning("worker %s: job %s stalled on a silent worker; back to %s", self.name, job.id,
                                job.queue)
                    await self.app.job_manager.retry_job(job)
            except Exception:
                log.warning("worker %s: heartbeat or sweep failed", self.name, exc_info=True)
            await asyncio.sleep(self.settings.worker_heartbeat_s)

    def run(self) -> None:
        async def main() -> None:
            async with self.app.open_async():
                sweep = asyncio.create_task(self._sweep())
                try:
                    await self.app.run_worker_async(
                        queues=[queue_name(p) for p in self.profiles], name=self.name, concurrency=self.concurrency,
                        update_heartbeat_interval=self.settings.worker_heartbeat_s,
                        stalled_worker_timeout=self.settings.worker_stall_s, delete_jobs="successful")
                finally:
                    sweep.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await sweep

        log.info("worker %s: formats %s, flags %s, profiles %s", self.name, self.formats, self.flags, self.profiles)
        try:
            asyncio.run(main())
        finally:
            with contextlib.suppress(Exception):
                self.unregister()
            self.engine.dispose()

    # -- one part

    def _task(self, context, part_id: int) -> str:
        return self.convert_part(part_id)

    def convert_part(self, part_id: int) -> str:
        from fleet_server.jobs import ConversionFailedError, _convert_sandboxed
        from fleet_server.sandbox import SandboxCancelledError, SandboxError

        with Session(self.engine) as s:
            part = s.get(ConversionPart, part_id, with_for_update=True)
            if part is None:
                return "gone"
            job = s.get(ConversionJob, part.job_id)
            if part.status in FINAL or job.status == JobStatus.CANCELLED:
                return "skipped"  # done by an earlier run, or cancelled while it waited
            part.status, part.worker, part.attempts = JobStatus.RUNNING, self.name, part.attempts + 1
            part.started_at = utcnow()
            s.add(part)
            s.flush()
            settle(s, part.job_id)
            s.commit()
            job_id, profile, attempt = part.job_id, part.profile, part.attempts
            version = s.get(ModelVersion, job.model_version_id).model_copy()
        self.current[part_id] = f"job {job_id} {profile}"
        lines: list[str] = []
        flushed = [time.monotonic()]

        def say(message: str, *, flush: bool = False) -> None:
            lines.append(f"{time.strftime('%H:%M:%S')} [{profile}] {message}")
            if flush or time.monotonic() - flushed[0] > LOG_FLUSH_S:
                flushed[0] = time.monotonic()
                batch = lines[:]
                lines.clear()
                append_log(self.engine, job_id, batch, progress=f"{profile}: {message}")

        def cancelled() -> bool:
            with Session(self.engine) as s:
                p = s.get(ConversionPart, part_id)
                j = s.get(ConversionJob, job_id)
                return p.status == JobStatus.CANCELLED or j.status == JobStatus.CANCELLED

        say(f"taken by {self.name} (attempt {attempt})", flush=True)
        try:
            results = _convert_sandboxed(version, [profile], self.store, self.sandbox, say, cancelled)
        except SandboxCancelledError:
            say("cancelled: the conversion was stopped", flush=True)
            self._finish(part_id, JobStatus.CANCELLED, "cancelled")
            return "cancelled"
        except (ConversionFailedError, SandboxError) as e:  # the converter's verdict on this input: final
            say(f"failed: {e}", flush=True)
            self._finish(part_id, JobStatus.FAILED, str(e))
            return "failed"
        except Exception as e:  # an outage (database, object store): worth another try
            reason = f"{type(e).__name__}: {e}"
            if attempt >= self.settings.job_attempts:
                say(f"failed after {attempt} attempts: {reason}", flush=True)
                self._finish(part_id, JobStatus.FAILED, f"after {attempt} attempts: {reason}")
                return "failed"
            say(f"attempt {attempt} failed ({reason}); retrying", flush=True)
            with Session(self.engine) as s:
                s.execute(update(ConversionPart).where(ConversionPart.id == part_id,  # type: ignore[arg-type]
                                                       ConversionPart.status == JobStatus.RUNNING)
                          .values(status=JobStatus.QUEUED, error=reason[:2000]))
                s.commit()
            raise TransientError(reason) from e
        finally:
            self.current.pop(part_id, None)
        with Session(self.engine) as s:
            part = s.get(ConversionPart, part_id, with_for_update=True)
            if part.status in FINAL:  # cancelled meanwhile, or another run finished first: register nothing
                return "skipped"
            for r in results:
                s.add(ConvertedArtifact(job_id=job_id, model_version_id=version.id, **r))
            part.status, part.finished_at, part.error = JobStatus.SUCCEEDED, utcnow(), ""
            s.add(part)
            s.flush()
            settle(s, job_id)
            s.commit()
        say("done: " + ", ".join(f"{r['format']} {r['status']}" for r in results), flush=True)
        return "succeeded"

    def _finish(self, part_id: int, status: JobStatus, error: str) -> None:
        with Session(self.engine) as s:
            part = s.get(ConversionPart, part_id, with_for_update=True)
            if part.status not in FINAL:
                part.status, part.error, part.finished_at = status, error[:2000], utcnow()
                s.add(part)
                s.flush()
            settle(s, part.job_id)
            s.commit()
