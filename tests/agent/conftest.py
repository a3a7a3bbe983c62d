"""Real Mosquitto, real signed offers, real agent processes."""

import itertools
from pathlib import Path

import numpy as np
import pytest

from tests import zoo
from tests.fleet_driver import AgentProcess, Broker, FleetDriver, Release, agent_config, free_port, golden

_ids = itertools.count()


@pytest.fixture(scope="session")
def broker(tmp_path_factory):
    b = Broker(tmp_path_factory.mktemp("broker")).start()
    yield b
    b.stop()


def make_release(path: Path, version: str, seed: int) -> Release:
    model = zoo.mlp_opset(path, opset=13, seed=seed)
    x = np.random.default_rng(42).standard_normal((1, 3, 16, 16)).astype(np.float32)
    return Release("classifier", version, model.read_bytes(), golden(model, {"x": x}))


@pytest.fixture(scope="session")
def releases(tmp_path_factory):
    d = tmp_path_factory.mktemp("releases")
    return {v: make_release(d / f"{v}.onnx", v, seed) for v, seed in (("1.0.0", 0), ("1.1.0", 1), ("1.2.0", 2))}


@pytest.fixture
def fleet(broker, tmp_path):
    """A driver and a factory for agent processes bound to it; everything is stopped afterwards."""
    device = f"dev{next(_ids)}"
    driver = FleetDriver(broker.url, device)
    started: list[AgentProcess] = []

    def agent(**settings) -> AgentProcess:
        env = settings.pop("env", {})
        port = settings.pop("port", None) or free_port()
        cfg = agent_config(tmp_path / f"{device}.toml", device_id=device, broker_url=broker.url, root=driver.root,
                           state_dir=tmp_path / "state", port=port, **settings)
        sock = settings.get("api_socket")
        proc = AgentProcess(cfg, port, env=env, driver=driver, socket=Path(sock) if sock else None)
        started.append(proc)
        return proc

    driver.agent = agent
    yield driver
    for p in started:
        p.stop()
    driver.close()


@pytest.fixture(scope="session")
def tflite_model(tmp_path_factory):
    """A full-integer INT8 .tflite from our converter's TFLite worker (int8 I/O, NHWC input; not gated: random
    weights)."""
    from converters import onnx_int8, tflite_int8
    from converters.calibration import synthetic_dataset
    from converters.source import load_source

    d = tmp_path_factory.mktemp("tflite")
    onnx_path = zoo.mlp_opset(d / "m.onnx", opset=13, seed=0)
    source = load_source(onnx_path, d / "work")
    prepared = onnx_int8.prepare(source, d / "work")
    build = tflite_int8.build(source, prepared.path, synthetic_dataset(source.inputs, 32).samples, d / "work")
    return build.int8
