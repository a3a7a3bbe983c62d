"""edgefleet fleet server: ``create_app(settings)`` (FastAPI + SQLModel), enrollment and device identity, API
tokens and audit, content-addressed artifacts, fleet keys, the ``fleet-server`` CLI."""
