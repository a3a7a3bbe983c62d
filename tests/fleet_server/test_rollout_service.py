"""fleet_server.rollouts.service on SQLite: each refusal with its status, and what a created rollout stores."""

import pytest
from sqlmodel import Session, SQLModel, create_engine, select

from fleet_server.models import AuditEntry, ConvertedArtifact, ModelVersion, Rollout
from fleet_server.rollouts import service

STRATEGY = {"canary_percent": 10.0, "waves_percent": [50.0, 100.0], "rate_per_minute": 1000, "soak_s": 0.0,
            "stage_timeout_s": 3600.0, "require_approval": False, "ramp_factor": 1.0, "ramp_every": 0,
            "max_rate_per_minute": None, "windows": []}
GATES = {"max_failure_share": 0.2, "min_finished": 1, "max_error_rate": None, "max_p99_ratio": None,
         "min_requests": 20, "min_fidelity": None}


@pytest.fixture
def session(tmp_path):
    engine = create_engine(f"sqlite:///{tmp_path / 'f.db'}")
    SQLModel.metadata.create_all(engine)
    with Session(engine) as s:
        for v in ("1.0", "2.0"):
            s.add(ModelVersion(name="m", version=v, source_sha256="a" * 64, source_format="onnx",
                               calibration_sha256="b" * 64))
        s.commit()
        s.add(ConvertedArtifact(job_id=1, model_version_id=1, profile="rpi5", format="onnx-int8", status="shippable",
                                artifact_sha256="c" * 64, report_sha256="d" * 64))
        s.commit()
        yield s


@pytest.mark.parametrize(("model", "version", "strategy", "gates", "error", "status"), [
    ("m", "9.9", STRATEGY, GATES, service.UnknownModelVersionError, 404),
    ("m", "2.0", STRATEGY, GATES, service.NotReleasableError, 409),
    ("m", "1.0", {**STRATEGY, "waves_percent": [100.0, 50.0]}, GATES, service.InvalidPlanError, 422),
    ("m", "1.0", STRATEGY, {**GATES, "max_failure_share": 2.0}, service.InvalidPlanError, 422),
])
def test_refusals_carry_their_status_and_store_nothing(session, model, version, strategy, gates, error, status):
    with pytest.raises(error) as e:
        service.create_rollout(session, model=model, version=version, selector={}, strategy=strategy, gates=gates,
                               actor="op")
    assert e.value.status == status and not session.exec(select(Rollout)).all()


@pytest.mark.parametrize("start", [False, True])
def test_a_rollout_is_stored_and_audited(session, start):
    r = service.create_rollout(session, model="m", version="1.0", selector={"tags": ["x"]}, strategy=STRATEGY,
                               gates=GATES, actor="op", name="n", start=start)
    assert r.model_version_id == 1 and r.selector == {"tags": ["x"]} and r.strategy == STRATEGY and r.gates == GATES
    assert (r.state, r.started_at is not None) == (("running", True) if start else ("draft", False))
    [entry] = session.exec(select(AuditEntry)).all()
    assert (entry.action, entry.target, entry.detail) == ("rollout.create", f"rollout:{r.id}",
                                                          "m 1.0 started" if start else "m 1.0")
