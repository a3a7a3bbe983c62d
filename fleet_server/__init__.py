"""edgefleet fleet_server: built by a later issue (see shared/ARCHITECTURE.md)."""
