"""Turn one source model into an INT8 artifact per hardware profile, each with a measured fidelity report.

Pure over files: functions take paths and arrays and return artifacts and reports; no network, no database.
"""

__version__ = "0.1.0"
