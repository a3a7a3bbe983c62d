"""``fleet-agent run`` with a pause at one boundary of an update, for the power-loss tests (test only).

    python -m tests.agent.paused_agent --config agent.toml --pause-at staging
    python -m tests.agent.paused_agent --config agent.toml --pause-after switch

The updater's ``on_step`` hook sleeps when the update reaches ``--pause-at`` (a state, just journaled, before its
actions) or has done ``--pause-after`` (an action, before its outcome is journaled), and says so in the log first,
so the test can ``kill -9`` the agent exactly there. Production agents get no hook (``agent.updater.no_hook``).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from agent.daemon import Agent
from agent.machine import Action, State
from agent.settings import load_settings

log = logging.getLogger("tests.agent.paused_agent")
PAUSE_S = 3600.0


def pause_hook(*, at: State | None, after: Action | None):
    """``on_step`` that stops the updater thread at the state or after the action named (while a job runs)."""

    def on_step(where: State | Action) -> None:
        wanted = at if isinstance(where, State) else after
        if where is wanted and where is not State.IDLE:
            log.warning("test hook: pausing at %s", where.value)
            time.sleep(PAUSE_S)

    return on_step


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="paused_agent", description=__doc__.splitlines()[0])
    p.add_argument("--config", "-c", type=Path, required=True)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--pause-at", type=State, choices=sorted(State, key=list(State).index))
    where.add_argument("--pause-after", type=Action, choices=list(Action))
    args = p.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    agent = Agent(load_settings(args.config), on_step=pause_hook(at=args.pause_at, after=args.pause_after))
    agent.start()
    print(f"paused_agent: serving on {agent.api_address}", flush=True)
    agent.run_until_signalled()


if __name__ == "__main__":
    main()
