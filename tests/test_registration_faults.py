"""A tracking server lost during an onboarding leaves no version without an alias and no run
RUNNING (a real MLflow server subprocess, killed by PID, restarted on the same store)."""

from __future__ import annotations

import pytest
from helpers import small_config
from mlflow.tracking import MlflowClient
from servers import BIN, free_port, process

from flows.onboard import onboard_generator
from flows.processes import stop
from registry.versions import RegistrationError

MODEL = "lost-server-gen"


def _server(root, port):
    cmd = [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
           "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1"]
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    return process(cmd, f"http://127.0.0.1:{port}/health", 90, root / f"mlflow-{port}.log", env)


@pytest.mark.slow
def test_server_killed_while_the_version_is_created(prefect_harness, user_generator, real_folder, tmp_path, monkeypatch):
    spec, weights = user_generator
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    port = free_port()
    with _server(tmp_path, port) as handle:
        url = f"http://127.0.0.1:{port}"
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        original = MlflowClient.set_registered_model_alias

        def kill_then_alias(self, *args, **kwargs):
            stop(handle)  # the server dies between creating the version and aliasing it
            return original(self, *args, **kwargs)

        monkeypatch.setattr(MlflowClient, "set_registered_model_alias", kill_then_alias)
        with pytest.raises(RegistrationError, match="registering lost-server-gen version 1 failed"):
            onboard_generator(small_config(spec, weights, real_folder, name=MODEL, seed=5))
        monkeypatch.undo()
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    port = free_port()
    with _server(tmp_path, port):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
        client = MlflowClient(f"http://127.0.0.1:{port}")
        left = client.search_model_versions(f"name='{MODEL}'")
        assert [mv.tags.get("flipad.registration") for mv in left] == ["pending"]  # could not be deleted: server gone
        again = onboard_generator(small_config(spec, weights, real_folder, name=MODEL, seed=5))
        versions = client.search_model_versions(f"name='{MODEL}'")
        aliases = client.get_registered_model(MODEL).aliases
        assert [str(mv.version) for mv in versions] == [again.version] and aliases == {"champion": again.version}
        experiment = client.get_experiment_by_name(f"flipad/{MODEL}")
        statuses = sorted(r.info.status for r in client.search_runs([experiment.experiment_id]))
        assert statuses == ["FINISHED", "KILLED"], statuses
