"""How `make test` shares two cores (pytest-xdist, ``-n 2 --dist loadgroup``): the converters' tests, which keep
both cores busy with ONNX Runtime, TensorFlow and Core ML, run on one worker in one group; the server's, the
console's and the demo's, which wait on subprocesses (servers, agents, brokers, PostgreSQL, browsers), run as one
group on the other. One group each because some of them look at the whole machine: the sandbox tests count every
`fleet_server.sandbox` process, which a conversion in a concurrent server test would start. The agent's and the
protocol's tests fill in wherever a worker is free. Without xdist (`pytest` alone) nothing changes."""

from __future__ import annotations

from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
GROUPS = {"converters": "cpu", "fleet_server": "fleet", "console": "fleet", "test_demo.py": "fleet"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        top = Path(item.path).resolve().relative_to(TESTS).parts[0]
        group = GROUPS.get(top)
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(group))
