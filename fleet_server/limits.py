"""Bounds on numbers a client sends: what the databases can store (SQLite's INTEGER is 64-bit signed, PostgreSQL's
``integer`` 32-bit), found by schemathesis as 500s before they were here."""

MAX_ID = 2**31 - 1
MAX_OFFSET = 10_000_000
