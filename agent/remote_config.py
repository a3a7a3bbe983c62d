"""Desired settings from the server (issue 17, part 7), applied and reported back.

A document is verified like an update (the trusted root's online keys, unexpired, for this device) and must be
newer than the last one applied: the retained copy the broker hands over on every reconnect is recognised and
ignored, an older one is refused. Each setting is checked against ``fleet_protocol.config`` and applied live; what
this agent does not know or cannot take is reported with the reason instead of failing the whole document. The
applied settings are kept in the agent's store and applied again at start, over the config file, so a restart
does not undo them while the server is unreachable.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable

from agent.store import Store
from fleet_protocol import config
from fleet_protocol.errors import ProtocolError
from fleet_protocol.messages import ConfigOffer, ConfigReport
from fleet_protocol.metadata import UpdateVerifier

log = logging.getLogger(__name__)

Applier = Callable[[config.Scalar], None]


class RemoteConfig:
    def __init__(self, store: Store, *, verifier: Callable[[], UpdateVerifier], appliers: dict[str, Applier],
                 report: Callable[[ConfigReport], None], baseline: dict[str, config.Scalar] | None = None,
                 clock: Callable[[], float] = time.time):
        """``baseline``: the config file's value of each setting, restored when a document no longer sets it."""
        self._store, self._verifier, self._appliers, self._report, self._clock = \
            store, verifier, appliers, report, clock
        self._baseline = baseline or {}
        self.version, self.applied, self.digest = 0, {}, ""
        raw = store.get("config")
        try:
            saved = json.loads(raw) if raw else {}
            self.version, self.applied = int(saved.get("version", 0)), dict(saved.get("applied", {}))
            self.digest = str(saved.get("digest", ""))
        except (ValueError, TypeError, AttributeError) as e:  # unreadable: the retained document comes again
            log.warning("kept settings unreadable (%s): starting from the config file", e)

    def restore(self) -> None:
        """Apply the settings kept from the last document (at start, before anything runs on them)."""
        ok, refused = config.split(self.applied)  # checked again: this agent's bounds may be newer
        for name, why in refused.items():
            log.warning("kept setting %s not applied: %s", name, why)
        if ok:  # said first: a kept log level may quieten what follows
            log.info("kept settings of config version %d applied: %s", self.version, ok)
        for name, value in ok.items():
            self._apply(name, value)

    def offer(self, msg: ConfigOffer) -> None:
        try:  # the version applied passes here, to be recognised below
            verified = self._verifier().verify_config(msg.metadata, after_version=self.version - 1)
        except ProtocolError as e:
            log.warning("config refused: %s", e)
            return
        digest = hashlib.sha256(verified.spec.settings_json.encode()).hexdigest()
        if verified.version == self.version and digest == self.digest:
            return  # the retained copy of what is applied (every reconnect): nothing to do
        ok, refused = config.split(verified.spec.settings())
        applied = {}
        for name, value in ok.items():
            why = self._apply(name, value)
            if why is None:
                applied[name] = value
            else:
                refused[name] = why
        for name in self.applied.keys() - applied.keys():  # no longer set: back to the config file's value
            if name in self._baseline:
                self._apply(name, self._baseline[name])
        self.version, self.applied, self.digest = verified.version, applied, digest
        self._store.put(config=json.dumps({"version": self.version, "applied": applied,
                                           "digest": digest}).encode())
        log.info("config version %d: applied %s%s", self.version, applied,
                 f", refused {refused}" if refused else "")
        try:
            report = ConfigReport(version=self.version, applied=applied, refused=refused, ts=self._clock())
        except ValueError as e:  # more or longer names than a report carries (a newer server's document)
            report = ConfigReport(version=self.version, applied={}, refused={"document": str(e)[:200]},
                                  ts=self._clock())
        self._report(report)

    def _apply(self, name: str, value: config.Scalar) -> str | None:
        applier = self._appliers.get(name)
        if applier is None:
            return "this agent cannot apply it"
        try:
            applier(value)
        except (ValueError, OSError) as e:
            log.warning("setting %s=%r not applied: %s", name, value, e)
            return str(e)[:200]
        return None
