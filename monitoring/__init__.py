"""Drift and quality monitoring of attribution streams (Evidently; returns reports, stores nothing)."""
