"""kill -9 of the agent at every state of an update, then a restart: the device ends on the new model committed
or on the old one, never on a half-written or unprobed model, and answers a request right after the restart."""

import time

import numpy as np
import pytest

from .test_updates_e2e import install, predict, reference, wait_idle

pytestmark = pytest.mark.slow

# (hook, where): pause after journaling a state (before its side effects) or after an action (before its outcome
# is journaled): together every boundary of the update.
POINTS = [("at", "downloading"), ("at", "staging"), ("at", "probing"), ("at", "activating"), ("at", "committed"),
          ("after", "fetch"), ("after", "stage"), ("after", "probe"), ("after", "switch"), ("after", "report_ok")]


def wait_log(agent, text, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in agent.output():
            return
        time.sleep(0.05)
    raise TimeoutError(f"{text!r} never appeared in the agent log:\n{agent.output()[-2000:]}")


@pytest.mark.parametrize("hook,where", POINTS)
def test_kill_9_at_every_state_ends_on_old_or_new_committed(fleet, releases, hook, where):
    old, new = releases["1.0.0"], releases["1.1.0"]
    agent = fleet.agent()
    agent.start()
    install(fleet, agent, "j1", old)
    agent.stop()

    agent.entry = ["-m", "tests.agent.paused_agent", f"--pause-{hook}", where]  # the daemon, with a pause hook
    agent.start()
    fleet.offer("j2", new, base=old)
    wait_log(agent, f"test hook: pausing at {where}")
    agent.kill9()

    agent.entry = ["-m", "agent.cli", "run"]
    agent.start()
    x = np.random.default_rng(1).standard_normal((1, 3, 16, 16)).astype(np.float32)
    answered = predict(agent.port, x)  # right after the restart, before the update finishes
    assert answered.shape == (1, 10)
    result = fleet.wait_result("j2")
    info = wait_idle(agent)
    if result.result == "ok":
        assert (result.state, info["version"], info["sha256"]) == ("committed", "1.1.0", new.sha256)
        expected = new
    else:
        assert info["version"] == "1.0.0" and info["sha256"] == old.sha256, (result, info)
        expected = old
    np.testing.assert_allclose(predict(agent.port, x), reference(expected, x), rtol=1e-5, atol=1e-5)
    if (hook, where) in (("at", "activating"), ("after", "switch"), ("at", "committed"), ("after", "report_ok")):
        assert result.result == "ok"  # probed before the switch: resuming completes it
