"""Prefect flows and the `flipad` command line (composes flipad/, registry/ and monitoring/)."""
