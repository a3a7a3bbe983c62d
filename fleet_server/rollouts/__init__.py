"""The rollout engine: pure planner and gates, and the adapters that journal, sign, publish and ingest."""
