"""The "<model name> <version>" labels agents put in their telemetry and state reports (agent.slots.version_label).

A device serves several named models (issue 17), so a label is read for its model before anything compares labels:
"any other label" is another model as often as another version. Standard library only: the pure gates use it.
"""

from __future__ import annotations

import re

MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # fleet_protocol.messages.ID, as the registry names


def model_of(label: str | None) -> str | None:
    """The model a label names (its first word), or None when that is no name the registry could hold."""
    if not label:
        return None
    name = label.split(" ", 1)[0]
    return name if MODEL_NAME.match(name) else None


def is_version_of(label: str | None, model: str) -> bool:
    """Whether ``label`` is one of ``model``'s versions ("detector 1.2" is a version of detector, not of det)."""
    return label is not None and label.startswith(f"{model} ")
