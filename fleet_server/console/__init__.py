"""The operator console: a small single-page front end served by the fleet server under ``/ui``, and the read-only
aggregates it needs under ``/v1/console``. Everything it loads ships in this package (no CDN, works offline)."""

from fleet_server.console.router import mount_console

__all__ = ["mount_console"]
