"""Two `fleet-server serve` replicas on one PostgreSQL and one Mosquitto: kill -9 the one holding the rollout
engine's lease mid-rollout; the other takes over within the lease time and completes the rollout, with one offer per
device and every telemetry window stored (ingest goes on through the shared subscription)."""

import hashlib
import os
import signal
import time

import pytest
from sqlmodel import Session, func, select

from fleet_server.keys import pinned_root
from fleet_server.models import Device, EngineLease, TelemetryWindow
from fleet_server.rollouts.engine import LEASE_S
from fleet_sim.sim import SimFleet
from tests import zoo
from tests.fleet_driver import Broker, free_port
from tests.fleet_server.live_fleet import LiveFleet
from tests.fleet_server.test_rollouts_e2e import CommandSpy

pytestmark = pytest.mark.slow
DEVICES = 30


def lease_holder(fleet: LiveFleet) -> tuple[int, float] | None:
    with Session(fleet.db) as s:
        lease = s.get(EngineLease, "rollouts")
        if lease is None or lease.expires_at < time.time():
            return None
        return int(lease.holder.split(":")[1]), lease.expires_at


def test_scaleout_a_replica_takes_over_the_rollout_after_kill9_of_the_lease_holder(tmp_path, postgres):
    broker = Broker(tmp_path / "broker").start()
    fleet = LiveFleet(tmp_path, broker.url, db_url=postgres.create_database("replicas"))
    second_port = free_port()
    second = fleet.spawn_server(second_port, tmp_path / "server-2.log")
    sims = None
    try:
        model = zoo.mlp_opset(tmp_path / "m.onnx", opset=13, seed=0)
        fleet.register("classifier", "1.0.0", model)
        ids = [f"sim-{i:02d}" for i in range(DEVICES)]
        with Session(fleet.db) as s:
            s.add_all([Device(id=d, profile="rpi5", signing_public_key=hashlib.sha256(d.encode()).hexdigest(),
                              mqtt_password_hash="x") for d in ids])
            s.commit()
        sims = SimFleet(fleet.broker_url, pinned_root(fleet.data))
        devices = [sims.add(d, profile="rpi5", active_sha256=None) for d in ids]
        assert sims.connect_all(30) < 30
        fleet.wait(lambda: fleet.http.get("/v1/devices", params={"online": True}).json()["total"] == DEVICES, 20,
                   "the simulated devices online")
        sent = [0]
        last = [0.0]

        def telemetry(now: float) -> None:  # one window per device per second, all through the test
            if now - last[0] >= 1.0:
                last[0] = now
                for d in devices:
                    d.telemetry(requests=10)
                    sent[0] += 1

        spy = CommandSpy(fleet.broker_url)
        r = fleet.rollout(model="classifier", version="1.0.0",
                          strategy={"canary_percent": 10, "waves_percent": [40, 100], "soak_s": 2})
        assert sims.run(lambda: fleet.get(r["id"])["counts"].get("installed", 0) >= 3, 60, telemetry)
        holder = lease_holder(fleet)
        assert holder is not None
        victim = next(p for p in (fleet.server, second) if p.pid == holder[0])
        survivor = second if victim is fleet.server else fleet.server
        os.kill(victim.pid, signal.SIGKILL)
        killed = time.monotonic()
        assert sims.run(lambda: (lease_holder(fleet) or (0,))[0] == survivor.pid, LEASE_S + 15, telemetry)
        takeover = time.monotonic() - killed
        if victim is fleet.server:  # the survivor's API from now on
            fleet.http.base_url = f"http://127.0.0.1:{second_port}"
        target = hashlib.sha256(model.read_bytes()).hexdigest()
        assert sims.run(lambda: sum(d.active == target for d in devices) == DEVICES, 90, telemetry)
        done = fleet.wait_state(r["id"], {"completed", "paused", "aborted"}, timeout=30)
        stop_sending = time.monotonic()
        sims.run(lambda: time.monotonic() - stop_sending > 3, 5)  # let the last windows reach the broker
        spy.close()
        offers = spy.offers()
        with Session(fleet.db) as s:
            stored = lambda: s.exec(select(func.count()).select_from(TelemetryWindow)).one()  # noqa: E731
            fleet.wait(lambda: stored() >= sent[0], 30, "every telemetry window stored", lambda: (stored(), sent))
            count = stored()
    finally:
        if sims is not None:
            sims.close()
        for p in (second,):
            if p.poll() is None:
                p.kill()
        fleet.close()
        broker.stop()
    print(f"takeover after kill -9: {takeover:.1f} s (lease {LEASE_S:.0f} s); {sent[0]} telemetry windows sent, "
          f"{count} stored")
    assert takeover <= LEASE_S + 5
    assert done["state"] == "completed" and done["counts"] == {"installed": DEVICES}
    assert sorted(offers) == sorted(ids) and all(len(j) == 1 for j in offers.values()), offers
    assert sims.counts["full"] == DEVICES and not sims.counts["offer_refused"]
    assert count == sent[0]  # no window lost, none stored twice
    survivor_log = (tmp_path / ("server-2.log" if survivor is second else "server.log")).read_text()
    assert "draining its broker session" in survivor_log and "session ended" in survivor_log
    assert "Traceback" not in survivor_log


def test_scaleout_replica_registry_finds_dead_sessions_and_spares_revived_ones(tmp_path):
    from fleet_server.db import make_engine
    from fleet_server.migrate import upgrade
    from fleet_server.replicas import DEAD_AFTER_S, Replicas

    url = f"sqlite:///{tmp_path / 'fleet.db'}"
    upgrade(url)
    db = make_engine(url)
    now = [1000.0]
    drained: list[str] = []
    leading = [False]

    def replica(name: str) -> Replicas:
        return Replicas(db, name, name, leading=lambda: leading[0], clock=lambda: now[0],
                        adopt=lambda row: drained.append(row.client_id) or 7)

    a, b, c = replica("fleet-server"), replica("fleet-server-1"), replica("fleet-server-2")
    for r in (a, b, c):
        r.beat()
    c.stop()  # a clean stop leaves the registry: nothing to adopt
    now[0] += DEAD_AFTER_S + 1
    a.check()  # not leading: only beats
    assert drained == [] and [r.client_id for r in a.orphans()] == ["fleet-server-1"]
    leading[0] = True
    stale = a.orphans()[0]
    b.beat()  # b came back before the leader acted on what it read
    a.retire(stale)
    assert [r.client_id for r in a.orphans()] == []  # a newer heartbeat is not retired
    now[0] += DEAD_AFTER_S + 1
    a.check()
    assert drained == ["fleet-server-1"] and a.adopted == [("fleet-server-1", 7)] and a.orphans() == []
    db.dispose()
