"""The ``flipad`` command. Heavy imports happen inside commands so ``flipad --help`` stays instant."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from enum import Enum
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Was this made by my generator? (FLIPAD)")


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Promote(str, Enum):
    auto = "auto"
    always = "always"
    never = "never"


def _print_version(value: bool) -> None:
    if value:
        try:
            typer.echo(f"flipad {version('flipad')}")
        except PackageNotFoundError:
            typer.echo("flipad (not installed as a package)")
        raise typer.Exit()


@app.callback()
def main(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log at INFO level."),
    show_version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                      help="Print the version and exit."),
) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # Prefect reads these when imported (inside the commands): its run logs and tracebacks only
    # with --verbose (our errors end in one line), and no telemetry from an offline machine
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO" if verbose else "CRITICAL")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Prefect's temporary server gets 20 s to start by default, which a busy 2-core machine can
    # exceed (the command then fails before any work); 120 s, unless the user set their own
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    # MLflow's own chatter (run URLs on stdout, INFO lines) only with --verbose: the command prints
    # the run's URL itself and an error stays one line
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "false" if verbose else "true")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "INFO" if verbose else "WARNING")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "true" if verbose else "false")
    # a lost tracking server is reported within seconds, not after MLflow's default retries
    # (7 with a backoff factor of 2: minutes per request); a user's own settings win
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    logging.getLogger("mlflow").setLevel(logging.INFO if verbose else logging.WARNING)  # if already imported
    logging.getLogger("urllib3").setLevel(logging.INFO if verbose else logging.ERROR)  # its retry warnings
    # the libraries' Python warnings (two lines each) only with --verbose, as log lines
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").setLevel(logging.WARNING if verbose else logging.ERROR)


class _ProgressHandler(logging.Handler):
    """Progress lines on whatever ``sys.stderr`` is when each is written. On a terminal the
    running stage's status (the heartbeat's indented lines, with their bar) is redrawn in place;
    elsewhere (logs, CI) each is a line."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.setFormatter(logging.Formatter("%(message)s"))
        self.live = False

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = sys.stderr
            message = self.format(record)
            if stream.isatty() and message.startswith("  "):
                stream.write(f"\r\033[K{message.strip()}")
                self.live = True
            else:
                stream.write(("\r\033[K" if self.live else "") + message + "\n")
                self.live = False
            stream.flush()
        except Exception:  # a closed or broken stream never fails the work it reports on
            self.handleError(record)


def _show_progress() -> None:
    """Progress lines (``flipad.progress``) on stderr, whatever the log level; a status redrawn
    every second on a terminal, a line every 15 s otherwise."""
    from flipad.progress import INTERVAL, set_interval

    handler = _ProgressHandler()
    shown = logging.getLogger("flipad.progress")
    shown.handlers[:] = [handler]
    shown.setLevel(logging.INFO)
    shown.propagate = False
    set_interval(1.0 if sys.stderr.isatty() else INTERVAL)


def _fail(exc: Exception) -> None:
    """One line on stderr and exit code 1, for the errors a user can act on."""
    typer.echo(f"error: {exc}", err=True)
    raise typer.Exit(1)


def _invalid(exc) -> str:
    """A pydantic ValidationError as one line naming the flags: ``--flag: message; ...``."""
    renamed = {"generator_kwargs": "option", "models": "model", "family_settings": "set"}

    def flag(loc) -> str:
        return "--" + renamed.get(str(loc[0]), str(loc[0])).replace("_", "-") if loc else "input"
    return "; ".join(f"{flag(e['loc'])}: {e['msg'].removeprefix('Value error, ')}" for e in exc.errors())


def _check_device(device: str) -> None:
    """A CUDA request on a machine without CUDA, as one line before anything starts."""
    if device != "cuda":
        return
    # no GPU driver device nodes (NVIDIA, or ROCm's /dev/kfd) means no CUDA device: said at once,
    # without importing torch (seconds on a busy machine); otherwise torch decides
    if sys.platform.startswith("linux") and not (list(Path("/dev").glob("nvidia[0-9]*")) or Path("/dev/kfd").exists()):
        available = False
    else:
        import torch

        available = torch.cuda.is_available()
    if not available:
        raise ValueError("--device cuda: this machine has no CUDA device; use --device cpu or auto")


def _check_kind(kind: str | None) -> None:
    """An unknown ``--detector`` as one line before anything starts."""
    from flipad.detectors.base import detector_class

    if kind is None:
        return
    try:
        detector_class(kind)
    except ValueError as exc:
        raise ValueError(f"--detector: {exc}") from None


def _check_location(flag: str, location: str) -> None:
    """A local path that does not exist, as one line before anything starts (s3:// is checked when read)."""
    if not location.startswith("s3://") and not Path(location).exists():
        raise ValueError(f"{flag} {location} does not exist")


def _settings(values: list[str]) -> dict[str, dict[str, str]]:
    """``--set KIND.KEY=VALUE`` values as KIND -> KEY -> VALUE (typed and checked by the flow's config)."""
    out: dict[str, dict[str, str]] = {}
    for item in values:
        name, sep, raw = item.partition("=")
        kind, dot, key = name.partition(".")
        if not sep or not dot or not kind or not key:
            raise ValueError(f"--set {item!r} is not KIND.KEY=VALUE (flipad families lists the settings)")
        out.setdefault(kind, {})[key] = raw
    return out


def _options(values: list[str]) -> dict:
    out = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--option {item!r} is not KEY=VALUE")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


@app.command()
def onboard(
    name: str = typer.Argument(..., help="Registered model name for this generator's detector."),
    generator: str = typer.Option(..., help="Built-in name, path/to/file.py:factory, package.module:factory, or "
                                  "diffusers:FOLDER (an AutoencoderKL saved by save_pretrained: its decoder)."),
    weights: Path | None = typer.Option(None, help="Weights: .safetensors or a torch.save'd state dict, also nested in a "
                                        "checkpoint (state_dict, netG_state_dict, g_ema, ...; module. prefixes removed)."),
    weights_key: str | None = typer.Option(None, help="The key of the generator's state dict in a checkpoint that "
                                           "holds several (the error lists the keys found)."),
    latent_shape: str | None = typer.Option(None, help="Latent shape, e.g. 64 or 64,1,1."),
    real: str = typer.Option(..., help="Real data: a folder of images, .npy/.npz, or a CSV."),
    negatives: list[str] = typer.Option([], help="Other generators' samples (repeatable)."),
    num_samples: int = typer.Option(2000, help="Generator samples (and at most as many real items) to train on."),
    num_validation: int = typer.Option(1000, help="Generator samples that set the thresholds."),
    num_test: int = typer.Option(500, help="Held-out items per source for the evaluation."),
    option: list[str] = typer.Option([], help="Factory keyword argument KEY=VALUE (JSON values), repeatable."),
    settings: list[str] = typer.Option([], "--set", metavar="KIND.KEY=VALUE",
                                       help="A detector kind's setting KIND.KEY=VALUE, repeatable "
                                       "(e.g. reconstruction.encoder_steps=500; `flipad families` lists every kind's "
                                       "settings with defaults and help)."),
    challenger_steps: int = typer.Option(300, help="GAN steps of the look-alike challengers onboarding builds (0: only "
                                         "a weight-perturbed copy)."),
    open_world: bool = typer.Option(True, help="Also evaluate recompressed own samples and look-alike challengers."),
    samples: str | None = typer.Option(None, help="The owner's generated images (folder or array), where the family "
                                       "would otherwise make its own items (an autoencoder: decoded real images)."),
    detector: str | None = typer.Option(None, help="The detector kind; default: the generator's own (autoencoder for "
                                        "diffusers:FOLDER), else reconstruction (full-generator latent inversion, "
                                        "thresholds calibrated on recompressed copies). Others: flipad, "
                                 "combined (FLIPAD and reconstruction loss must both accept), or any registered kind "
                                 "(`flipad families`)."),
    device: Device = typer.Option(Device.auto, help="Where the inversions run."),
    promote: Promote = typer.Option(Promote.auto, help="auto (champion if at least as good), always or never."),
    secret_file: Path | None = typer.Option(None, help="The owner's master secret, for a detector kind that declares "
                                            "one (owner-only permissions; default $FLIPAD_KEY_SECRET_FILE)."),
    secret_block: str | None = typer.Option(None, help="The master secret as a Prefect Secret block of this name."),
    deployment: str | None = typer.Option(None, help="Run on a worker through this Prefect deployment "
                                          "(e.g. onboard-generator/onboard-generator) instead of in this process."),
) -> None:
    """Train, evaluate and register a detector for one generator (MLflow + Prefect)."""
    try:  # the checks that need no heavy import come first: a typo is reported at once
        _check_location("--real", real)
        for path in negatives:
            _check_location("--negatives", path)
        if samples is not None:
            _check_location("--samples", samples)
        if weights is not None and not weights.is_file():
            raise ValueError(f"--weights {weights} is not a file")
        _check_device(device.value)
    except ValueError as exc:
        _fail(exc)
    if secret_file is not None:
        _check_secret_file(secret_file)
        secret_file = secret_file.resolve()
    _show_progress()
    from flipad.progress import stage

    try:  # never silent: the stage's heartbeat speaks while the imports and Prefect start, and between stages
        with stage(f"onboard {name}"):
            _onboard_command(name, generator, weights, weights_key, latent_shape, real, negatives, samples, num_samples,
                             num_validation, num_test, option, settings, challenger_steps, open_world, detector, device,
                             promote, secret_file, secret_block, deployment)
    except _Failed as exc:  # said once the stage has said it failed, so the error is the last line
        _fail(exc.args[0])


class _Failed(Exception):
    """An error a user can act on, raised inside a progress stage and reported by :func:`_fail` after it."""


def _onboard_command(name, generator, weights, weights_key, latent_shape, real, negatives, samples, num_samples,
                     num_validation, num_test, option, settings, challenger_steps, open_world, detector, device, promote,
                     secret_file, secret_block, deployment) -> None:
    """The body of ``flipad onboard`` after the quick checks (inside its progress stage)."""
    from pydantic import ValidationError

    from flipad.generators.loading import GeneratorLoadError, parse_latent_shape
    from flipad.generators.tracing import NotInvertibleError
    from flipad.io.data import DataError
    from flows.submit import (
        DeploymentRunError,
        absolute_generator,
        absolute_location,
        run_through_deployment,
    )
    from registry.store import TrackingError, TrackingUnavailableError, connect, ui_command
    from registry.versions import RegistrationError, list_versions

    try:
        _check_kind(detector)
        uri = connect()  # fail before Prefect starts anything
        from flows.onboard import OnboardConfig, onboard_generator

        if deployment:  # the worker resolves paths from its own working directory
            generator, real = absolute_generator(generator), absolute_location(real)
            weights, negatives = (weights and weights.resolve()), [absolute_location(n) for n in negatives]
            samples = samples and absolute_location(samples)
        config = OnboardConfig(
            name=name, generator=generator, weights=str(weights) if weights else None, weights_key=weights_key,
            generator_kwargs=_options(option), latent_shape=parse_latent_shape(latent_shape), real=real,
            negatives=tuple(negatives), samples=samples, num_samples=num_samples, num_validation=num_validation,
            num_test=num_test,
            detector=detector, family_settings=_settings(settings), device=device.value, promote=promote.value,
            challenger_steps=challenger_steps, open_world=open_world,
            secret_file=str(secret_file) if secret_file else None, secret_block=secret_block,
        )
        if deployment:
            run = run_through_deployment(deployment, config)
            typer.echo(f"flow run {run.name} ({run.id}) of {deployment} completed on a worker")
            _print_versions(list_versions(name))
            typer.echo(f"versions and runs in the MLflow UI: {ui_command(uri)} (model {name})")
            return
        result = onboard_generator(config)
    except ValidationError as exc:
        raise _Failed(ValueError(_invalid(exc))) from None
    except (GeneratorLoadError, DataError, NotInvertibleError, TrackingUnavailableError, DeploymentRunError,
            RegistrationError, ValueError, LookupError) as exc:
        raise _Failed(exc) from None
    except TrackingError as exc:  # the tracking server failed mid-run
        raise _Failed(RuntimeError(f"the tracking server failed during onboarding ({str(exc).splitlines()[0][:200]}); "
                                   "nothing was registered (the next onboarding ends a run left RUNNING as KILLED and "
                                   "removes a pending version); rerun when it is back")) from None
    typer.echo(result.results.to_string(index=False))
    typer.echo(
        f"registered {result.name} version {result.version} as {result.alias} "
        f"(balanced accuracy {result.metrics['primary_balanced_accuracy']:.4f} mean, "
        f"{result.metrics['worst_balanced_accuracy']:.4f} worst source; own items attributed "
        f"{result.metrics['worst_own_accepted']:.3f} at worst)\n"
        f"run: {result.run_url}\nUI:  {result.ui_command}"
    )
    if result.same_generator:
        typer.echo(f"note: the generator has the same weights as {', '.join(result.same_generator)} "
                   "(for an autoencoder, the same decoder): those detectors attribute the same items")


@app.command()
def attribute(
    model: list[str] = typer.Option(..., help="NAME, NAME@ALIAS or NAME/VERSION (repeatable; default alias champion)."),
    input: str = typer.Option(..., "--input", help="A folder or s3://bucket/prefix of new content."),
    output: str = typer.Option(..., help="results.csv, results.parquet or s3://bucket/prefix."),
    batch_size: int = typer.Option(256, help="Items per batch (the unit of atomic commits)."),
    endpoint_url: str | None = typer.Option(None, help="S3-compatible endpoint URL (MinIO, ...)."),
    workers: int = typer.Option(0, help="Score on a local Dask cluster with this many worker processes (0: in-process)."),
    monitor: bool = typer.Option(True, help="Drift report against the onboarding reference."),
    webhook: str | None = typer.Option(None, help="POST a JSON alert here when a monitor alarms."),
    secret_file: Path | None = typer.Option(None, help="The key sets' master secret (owner-only permissions; default "
                                            "$FLIPAD_KEY_SECRET_FILE): adds the recipient of keyed items."),
    secret_block: str | None = typer.Option(None, help="The master secret as a Prefect Secret block of this name."),
    deployment: str | None = typer.Option(None, help="Run on a worker through this Prefect deployment "
                                          "(e.g. attribute-stream/attribute-stream-hourly) instead of in this process."),
) -> None:
    """Score new items of a folder or S3 prefix with registered detectors (exactly once per item version)."""
    if secret_file is not None:
        _check_secret_file(secret_file)
    from pydantic import ValidationError

    from flows.storage import StorageError
    from flows.submit import (
        DeploymentRunError,
        absolute_location,
        run_through_deployment,
    )
    from registry.store import TrackingUnavailableError, connect

    _show_progress()
    try:
        connect()
        from registry.versions import parse_model_ref, resolve_version

        if not deployment:  # an unknown model is reported before Prefect starts (a worker resolves its own)
            for ref in model:
                resolve_version(*parse_model_ref(ref))
        from flows.attribute import AttributeConfig, attribute_stream

        if deployment:
            if workers:
                raise ValueError("--workers applies to runs in this process; a deployment's work pool decides where it runs")
            input, output = absolute_location(input), absolute_location(output)
        config = AttributeConfig(models=tuple(model), input=input, output=output, batch_size=batch_size,
                                 endpoint_url=endpoint_url, monitor=monitor, webhook=webhook,
                                 secret_file=str(secret_file.resolve()) if secret_file else None,
                                 secret_block=secret_block)
        if deployment:
            run = run_through_deployment(deployment, config)
            typer.echo(f"flow run {run.name} ({run.id}) of {deployment} completed on a worker; results in {output}")
            return
        flow_fn = attribute_stream
        if workers:
            from prefect_dask import DaskTaskRunner

            flow_fn = attribute_stream.with_options(task_runner=DaskTaskRunner(
                cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True}))
        result = flow_fn(config)
    except ValidationError as exc:
        _fail(ValueError(_invalid(exc)))
    except (TrackingUnavailableError, StorageError, DeploymentRunError, LookupError, RuntimeError, ValueError) as exc:
        _fail(exc)
    typer.echo(f"{result.new_rows} new rows from {result.listed} listed items in {result.batches} batches "
               f"({result.seconds:.1f} s); {len(result.rows)} rows in {output}")
    from monitoring.monitors import report_lines

    for name, summary in result.drift.items():
        typer.echo("\n".join(report_lines(name, summary, result.reports[name])))


def _check_secret_file(path: Path) -> bytes:
    """The master secret in ``path``, or one line saying why it is refused (missing, readable by
    others, too short)."""
    from flipad.keys import SecretError, read_secret_file

    try:
        return read_secret_file(path)
    except SecretError as exc:
        _fail(exc)


keys_app = typer.Typer(no_args_is_help=True, help="Keyed sampling: key sets that tell which recipient made an image.")
app.add_typer(keys_app, name="keys")


@keys_app.command("new")
def keys_new(
    name: str = typer.Argument(..., help="An onboarded generator's registered model."),
    secret_file: Path = typer.Option(..., help="The master secret: a file with owner-only permissions (chmod 600)."),
    recipients: str = typer.Option(..., help="A file with one recipient name per line, or N (named r0001...)."),
) -> None:
    """Register a new key set version for NAME (only names and key ids reach MLflow)."""
    secret = _check_secret_file(secret_file)
    from flipad.keys import KeySet, recipient_names
    from registry.keysets import next_keyset_version, register_keyset
    from registry.store import TrackingUnavailableError, connect
    from registry.versions import load_detector

    try:
        names = recipient_names(int(recipients) if recipients.isdigit() else Path(recipients).read_text().splitlines())
        connect()
        detector, _ = load_detector(name)
        latent_dim = math.prod(detector.generator_info()["latent_shape"])
        keys = KeySet(secret, names, latent_dim, next_keyset_version(name))
        run_id = register_keyset(name, keys)
    except (OSError, ValueError, LookupError, TrackingUnavailableError) as exc:
        _fail(exc)
    typer.echo(f"registered key set version {keys.version} of {name}: {len(names)} recipients (run {run_id}); "
               "keep the secret file: every version's keys are derived from it")


@keys_app.command("list")
def keys_list(name: str = typer.Argument(..., help="A registered model.")) -> None:
    """The key set versions of NAME with their recipients' names and key ids."""
    from registry.keysets import public_keysets
    from registry.store import connect

    try:
        connect()
        sets = public_keysets(name)
    except (ValueError, LookupError) as exc:
        _fail(exc)
    for version, public in sets.items():
        shown = ", ".join(f"{r['name']} ({r['key_id']})" for r in public["recipients"][:5])
        more = len(public["recipients"]) - 5
        typer.echo(f"v{version}: {len(public['recipients'])} recipients: {shown}{f', ... {more} more' if more > 0 else ''}")


@app.command()
def sample(
    name: str = typer.Argument(..., help="An onboarded generator's registered model (its champion's generator)."),
    secret_file: Path = typer.Option(..., help="The master secret the key set was made with."),
    key: str = typer.Option(..., help="The recipient's name."),
    n: int = typer.Option(16, "-n", help="How many samples."),
    out: Path = typer.Option(..., help="The folder the PNGs are written to."),
    key_set: str | None = typer.Option(None, help="The key set version (default: the newest)."),
    seed: int | None = typer.Option(None, help="Seed of the magnitudes (default: fresh randomness)."),
) -> None:
    """Draw N samples keyed for one recipient as PNGs (what a serving application does with flipad.keys.KeyedSampler)."""
    secret = _check_secret_file(secret_file)
    import secrets

    from flipad.io.data import encode_item
    from flipad.io.files import atomic_write
    from flipad.keys import KeyedSampler
    from registry.keysets import keysets
    from registry.store import connect
    from registry.versions import load_detector

    try:
        connect()
        detector, _ = load_detector(name)
        versions = {k.version: k for k in keysets(name, secret)}
        if not versions:
            raise LookupError(f"{name} has no key set; create one with 'flipad keys new {name}'")
        version = key_set or max(versions, key=int)
        if version not in versions:
            raise LookupError(f"--key-set {key_set}: {name} has key sets {', '.join(sorted(versions, key=int))}")
        chosen = versions[version]
        sampler = KeyedSampler(detector.module, detector.generator_info()["latent_shape"], chosen, detector.sample_range)
        images = sampler.sample(key, n, secrets.randbits(63) if seed is None else seed)
    except (KeyError, ValueError, LookupError) as exc:
        _fail(exc if not isinstance(exc, KeyError) else LookupError(f"--key: {exc.args[0]}"))
    for i, image in enumerate(images):
        atomic_write(out / f"{key}-{i:05d}.png", encode_item(image))
    typer.echo(f"{len(images)} samples keyed for {key} (key set v{chosen.version}) in {out}")


stack_app = typer.Typer(no_args_is_help=True, help="The production topology on this machine: MLflow + S3 + Prefect server + workers.")
app.add_typer(stack_app, name="stack")
STACK_DIR = typer.Option(Path(".flipad/stack"), "--dir", help="Where the stack keeps its state, databases and logs.")


def _stack(action: str, *args):
    """``flows.stack.<action>(*args)``, its StackError as one line and exit code 1."""
    from flows import stack

    try:
        return getattr(stack, action)(*args)
    except stack.StackError as exc:
        _fail(exc)


@stack_app.command("up")
def stack_up(
    directory: Path = STACK_DIR,
    host: str = typer.Option("127.0.0.1", help="Interface the servers bind to (keep loopback unless you firewall it)."),
    s3_port: int = typer.Option(9000, help="S3-compatible object store (moto server)."),
    mlflow_port: int = typer.Option(5000, help="MLflow tracking server and UI."),
    prefect_port: int = typer.Option(4200, help="Prefect server, API and UI."),
    deploy: bool = typer.Option(True, help="Register the deployments of deploy/prefect.yaml."),
) -> None:
    """Start the stack (servers, buckets, work pools, workers, deployments); write the environment to source."""
    from flows.stack import StackPorts

    env = _stack("up", directory, host, StackPorts(s3=s3_port, mlflow=mlflow_port, prefect=prefect_port), deploy)
    typer.echo(f"stack up: MLflow UI {env['MLFLOW_TRACKING_URI']}, Prefect UI {env['PREFECT_API_URL'].removesuffix('/api')}, "
               f"S3 {env['AWS_ENDPOINT_URL']}\nuse it from this shell: source {directory / 'stack.env'}")


@stack_app.command("down")
def stack_down(directory: Path = STACK_DIR) -> None:
    """Stop every process the stack started (by PID), workers first."""
    stopped = _stack("down", directory)
    typer.echo(f"stopped {', '.join(stopped)}" if stopped else "nothing was running")


@stack_app.command("status")
def stack_status(directory: Path = STACK_DIR) -> None:
    """Which of the stack's processes run, with their URLs and logs; exit code 1 unless all are up."""
    services = _stack("status", directory)
    if not services:
        typer.echo(f"no stack in {directory}; run 'flipad stack up'")
        raise typer.Exit(1)
    for s in services:
        typer.echo(f"{s.name:18s} {'up' if s.up else 'DOWN':5s} pid {s.pid:<8d} {s.url or '':28s} {s.log}")
    if not all(s.up for s in services):
        raise typer.Exit(1)


cache_app = typer.Typer(no_args_is_help=True, help="The onboarding flow's cached inversion results (Prefect's local storage).")
app.add_typer(cache_app, name="cache")


@cache_app.command("prune")
def cache_prune(
    older_than_days: float = typer.Option(7.0, min=0.0, help="Delete results written more than this many days ago "
                                          "(0: all); they stop counting as cache hits after 7 days."),
) -> None:
    """Delete cached stage results (flows/stage_cache.py); a later onboarding recomputes what it needs."""
    from datetime import timedelta

    from flows.stage_cache import prune

    done = prune(timedelta(days=older_than_days))
    typer.echo(f"removed {done.removed} cached stage results ({done.freed_bytes / 2**20:.1f} MiB) from {done.folder}; "
               f"{done.kept} kept")


@app.command()
def models(name: str | None = typer.Argument(None, help="A registered model; all when omitted.")) -> None:
    """Registered detectors: versions, aliases, key metrics."""
    from registry.store import TrackingUnavailableError, connect
    from registry.versions import list_versions

    try:
        connect()
        rows = list_versions(name)
    except (TrackingUnavailableError, LookupError) as exc:
        _fail(exc)
    except Exception as exc:  # a TrackingError for an unknown name
        _fail(ValueError(str(exc).splitlines()[0]))
    if not rows:
        typer.echo("no registered detectors yet; run 'flipad onboard' or 'flipad demo'")
        return
    _print_versions(rows)


def _print_versions(rows: list[dict]) -> None:
    typer.echo(f"{'name':20s} {'version':>7s} {'aliases':20s} {'worst BA':>8s}  generator")
    for r in rows:
        acc = "" if r["balanced_accuracy"] is None else f"{r['balanced_accuracy']:.4f}"
        typer.echo(f"{r['name']:20s} {r['version']:>7s} {r['aliases']:20s} {acc:>8s}  {r['generator_sha256']}")


@app.command()
def families() -> None:
    """The registered detector kinds: each one's settings (for --set KIND.KEY=VALUE), diagnostics and secret."""
    import dataclasses

    import flipad  # noqa: F401  (the built-in kinds register on import)
    from flipad.kinds import DETECTOR_ALIASES, DETECTOR_KINDS

    aliases = {kind: name for name, kind in DETECTOR_ALIASES.items()}
    for kind, cls in DETECTOR_KINDS.items():
        typer.echo(f"{kind}{f' (alias {aliases[kind]})' if kind in aliases else ''}: {cls.description}")
        for f in dataclasses.fields(cls.Settings):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
            typer.echo(f"  --set {kind}.{f.name}={shown}  {f.metadata.get('help', '')}")
        for name, meaning in cls.diagnostics.items():
            typer.echo(f"  column {name}: {meaning}")
        if cls.secret:
            typer.echo(f"  secret: {cls.secret}")


@app.command()
def demo(
    workdir: Path = typer.Option(Path(".flipad/demo"), help="Where the demo keeps its generators, stream and results."),
    num_samples: int = typer.Option(1500, help="Real images (and generator samples for FLIPAD) to train on."),
    num_validation: int = typer.Option(200, help="Generator samples that set the thresholds (half of them also recompressed)."),
    num_test: int = typer.Option(100, help="Held-out items per source, look-alike and recompressed variant."),
    num_stream: int = typer.Option(100, help="Items per source in the attributed folder."),
    train_steps: int = typer.Option(1000, help="GAN training steps for the demo generators (1000: the shipped ones; "
                                               "others are trained and cached)."),
    retrain: bool = typer.Option(False, help="Train the demo generators here even where shipped or cached ones exist."),
    encoder_steps: int = typer.Option(600, help="Training batches of the latent search's encoder."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
) -> None:
    """The whole story on the embedded default: train, onboard (MLflow), attribute a mixed folder."""
    _show_progress()
    from flipad.io.data import DataError
    from registry.store import TrackingUnavailableError, connect

    try:
        connect()
        from flows.demo import run_demo

        report = run_demo(workdir, num_samples=num_samples, num_validation=num_validation, num_test=num_test,
                          num_stream=num_stream, train_steps=train_steps, device=device, retrain=retrain,
                          encoder_steps=encoder_steps)
    except (DataError, TrackingUnavailableError) as exc:
        _fail(exc)
    typer.echo(report)


if __name__ == "__main__":
    app()
