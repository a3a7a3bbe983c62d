"""edgefleet fleet_protocol: built by a later issue (see shared/ARCHITECTURE.md)."""
