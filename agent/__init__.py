"""edgefleet device agent: MQTT link, power-safe A/B model updates, local inference API, store-and-forward
telemetry. The update logic is a pure state machine (``agent.machine``); everything else is a thin adapter."""
