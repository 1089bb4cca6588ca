"""MLflow tracking and model registry for per-generator detectors (all MLflow calls live here)."""
