"""deploy/: the compose file, the image definition and prefect.yaml reference only things that exist.

No container runtime runs in CI, so the compose file is checked statically (the same
interpolation rules as Docker Compose: ``${VAR:?msg}`` required, ``${VAR:-x}`` defaulted,
``$$`` escaped).
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import yaml
from prefect.client.schemas.schedules import CronSchedule
from prefect.flows import Flow, load_flow_from_entrypoint

from flows.attribute import AttributeConfig
from flows.onboard import OnboardConfig
from flows.stack import BUCKETS, POOLS

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
COMPOSE = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
PREFECT = yaml.safe_load((DEPLOY / "prefect.yaml").read_text())
DOCKERFILE = (DEPLOY / "Dockerfile").read_text()
VARIABLE = re.compile(r"(?<!\$)\$\{([A-Z0-9_]+)(:?[-?][^}]*)?\}")
CONFIGS = {"flows/onboard.py:onboard_generator": OnboardConfig, "flows/attribute.py:attribute_stream": AttributeConfig}


def example_env() -> dict[str, str]:
    pairs = [line.split("=", 1) for line in (DEPLOY / "example.env").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    return {k.strip(): v.strip() for k, v in pairs}


def interpolate(text: str, env: dict[str, str]) -> str:
    def value(match: re.Match) -> str:
        name, rule = match.group(1), match.group(2) or ""
        if name in env and env[name] != "":
            return env[name]
        if rule.startswith((":-", "-")):
            return rule.split("-", 1)[1]
        raise KeyError(f"${{{name}}} is required but not set")
    return VARIABLE.sub(value, text).replace("$$", "$")


def strings(node) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for k, v in node.items() for s in strings(k) + strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in strings(v)]
    return []


def services() -> dict[str, dict]:
    return COMPOSE["services"]


def test_every_compose_variable_is_in_the_example_env_and_nothing_else_is():
    env = example_env()
    used = {m.group(1) for s in strings(COMPOSE) for m in VARIABLE.finditer(s)}
    required = {m.group(1) for s in strings(COMPOSE) for m in VARIABLE.finditer(s) if (m.group(2) or "").startswith(":?")}
    assert required <= set(env), f"missing from example.env: {required - set(env)}"
    assert set(env) <= used, f"example.env sets unused variables: {set(env) - used}"
    for text in strings(COMPOSE):
        interpolate(text, env)  # every reference resolves with the example


def test_services_reference_existing_images_files_and_services():
    env = example_env()
    built = set(re.findall(r"-t (flipad:[a-z]+)", DOCKERFILE))
    assert built == {"flipad:cpu", "flipad:cuda"}
    for name, service in services().items():
        image = interpolate(service["image"], env)
        assert re.fullmatch(r"[a-z0-9./-]+:[A-Za-z0-9._-]+", image), (name, image)
        if image.startswith("flipad:"):
            assert image in built, (name, image)
        for dependency, rule in service.get("depends_on", {}).items():
            assert dependency in services(), (name, dependency)
            assert rule["condition"] in {"service_started", "service_healthy", "service_completed_successfully"}
            if rule["condition"] == "service_healthy":
                assert "healthcheck" in services()[dependency], dependency
        for volume in service.get("volumes", []):
            source = interpolate(volume, env).split(":")[0]
            if source.startswith("./") and source.endswith((".sql", ".yaml")):
                assert (DEPLOY / source).is_file(), (name, source)
            elif not source.startswith(("./", "/")):
                assert source in COMPOSE["volumes"], (name, source)


def test_databases_buckets_and_pools_line_up():
    init = (DEPLOY / "postgres-init.sql").read_text()
    urls = [v for s in services().values() for v in (s.get("environment") or {}).values() if "@postgres:5432/" in str(v)]
    assert len(urls) == 2
    for url in urls:
        assert f"CREATE DATABASE {url.rsplit('/', 1)[1]};" in init
    buckets = " ".join(services()["create-buckets"]["command"])
    assert all(f"store/{bucket}" in buckets for bucket in BUCKETS.values())
    assert services()["mlflow"]["environment"]["MLFLOW_ARTIFACTS_DESTINATION"].startswith(f"s3://{BUCKETS['mlflow']}/")
    worker_pools = {s["command"][s["command"].index("--pool") + 1] for s in services().values()
                    if s.get("command", [])[:3] == ["prefect", "worker", "start"]}
    deployment_pools = {d["work_pool"]["name"] for d in PREFECT["deployments"]}
    created = set(re.findall(r"work-pool create (\S+)", " ".join(services()["deployments"]["command"])))
    assert worker_pools == deployment_pools == created == set(POOLS)
    gpu = services()["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]


def test_security_defaults():
    env = example_env()
    assert env["BIND_ADDRESS"] == "127.0.0.1"
    for name, service in services().items():
        for port in service.get("ports", []):
            assert port.startswith("${BIND_ADDRESS"), (name, port)
        for key, value in (service.get("environment") or {}).items():
            if re.search(r"PASSWORD|SECRET|ACCESS_KEY|_URI$|_URL$", key) and "@" in str(value) or \
                    re.search(r"PASSWORD|SECRET|ACCESS_KEY", key):
                assert "${" in str(value), f"{name}.{key} holds a literal credential"
    assert "--allowed-hosts" in services()["mlflow"]["command"]
    assert "deploy/.env" in (ROOT / ".gitignore").read_text()


def test_workers_get_what_the_flows_read():
    match = re.search(r"FLIPAD_HOME=(\S+)", DOCKERFILE)
    assert match and f"WORKDIR {match.group(1)}" in DOCKERFILE
    for name in ("worker-cpu", "worker-gpu", "deployments"):
        environment = services()[name]["environment"]
        for key in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert key in environment, (name, key)
        assert environment["FLIPAD_HOME"] == match.group(1)


def test_image_installs_the_project_from_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    copied = set(re.findall(r"^COPY (\w+) \./\1$", DOCKERFILE, re.M))
    assert packages <= copied and "deploy" in copied
    assert "COPY pyproject.toml README.md ./" in DOCKERFILE
    extra = re.search(r'pip install "\.\[(\w+)\]"', DOCKERFILE).group(1)
    assert extra in project["project"]["optional-dependencies"]
    torch_pin = re.search(r"ARG TORCH_VERSION=(\S+)", DOCKERFILE).group(1)
    assert f"torch>=2.2,<={torch_pin}" in project["project"]["dependencies"]


@pytest.mark.parametrize("deployment", PREFECT["deployments"], ids=lambda d: d["name"])
def test_prefect_deployments_import_and_validate(deployment, monkeypatch):
    monkeypatch.chdir(ROOT)
    flow = load_flow_from_entrypoint(deployment["entrypoint"])
    assert isinstance(flow, Flow)
    config = CONFIGS[deployment["entrypoint"]]
    config(**deployment["parameters"]["config"])  # the stored defaults are valid parameters
    assert deployment["work_pool"]["name"] in POOLS
    for schedule in deployment.get("schedules", []):
        CronSchedule(cron=schedule["cron"], timezone=schedule.get("timezone"))  # raises on a bad expression
    pull = PREFECT["pull"][0]["prefect.deployments.steps.set_working_directory"]["directory"]
    assert pull == "{{ $FLIPAD_HOME }}"
