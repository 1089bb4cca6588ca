"""Where content comes from and results go: a local folder or an S3 prefix (boto3, any S3-compatible endpoint).

Results are written as one part file per batch, each made visible atomically (a rename on disk,
a single PUT on S3). The parts are also the record of what was processed: an item counts as done
for a detector version exactly when a committed part holds its row, so the record can never run
ahead of the results.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import re
import socket
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from stat import S_ISREG

import boto3
import pandas as pd
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from flipad.io.files import atomic_write

__all__ = ["ObjectRef", "StorageError", "LocalResults", "Results", "S3Results", "open_source", "open_results",
           "safe_file_name", "concat_rows", "S3_CONFIG"]

S3_CONFIG = Config(connect_timeout=5, read_timeout=30, retries={"total_max_attempts": 4, "mode": "standard"})
RESULT_KEY = ["uri", "etag", "model", "version"]
LEASE_TTL_S = 300.0  # an S3 lease left by a killed run blocks others this long at most


class StorageError(RuntimeError):
    """The object store or folder cannot be used; the message says what to do."""


@dataclass(frozen=True)
class ObjectRef:
    """One stored item: ``uri`` names it (always valid UTF-8), ``etag`` its content version (S3 ETag,
    or size + mtime + inode change time on disk), ``location`` where it is read from when that
    differs from ``uri`` (a local file name that is not valid UTF-8)."""

    uri: str
    etag: str
    size: int
    location: str = ""


def split_s3(uri: str) -> tuple[str, str]:
    bucket, _, prefix = uri[len("s3://"):].partition("/")
    if not bucket:
        raise StorageError(f"{uri} names no bucket; use s3://BUCKET/PREFIX")
    return bucket, prefix


def s3_client(endpoint_url: str | None = None):
    """A boto3 S3 client with bounded timeouts and retries; ``endpoint_url`` (or ``AWS_ENDPOINT_URL``) for MinIO etc."""
    return boto3.client("s3", endpoint_url=endpoint_url or os.environ.get("AWS_ENDPOINT_URL"), config=S3_CONFIG)


def _s3_error(action: str, uri: str, exc: Exception) -> StorageError:
    return StorageError(f"{action} {uri} failed ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
                        "check the endpoint, bucket and credentials")


class LocalSource:
    """Every regular file below a folder (any nesting); non-images are listed too and get error rows.

    Symbolic links (to files or folders) are never followed, so nothing outside the folder is
    read; ``exclude`` names paths that are not input (the results and their side files, when
    they live inside the folder).
    """

    def __init__(self, root: str | Path, exclude: Callable[[Path], bool] = lambda path: False):
        self.root = Path(root)
        if not self.root.is_dir():
            raise StorageError(f"{self.root} is not a folder")
        self.exclude = exclude

    def list(self) -> Iterator[ObjectRef]:
        root = self.root.resolve()
        found = []
        for folder, dirs, files in os.walk(root, followlinks=False):
            dirs[:] = sorted(d for d in dirs if not (Path(folder) / d).is_symlink() and not self.exclude(Path(folder) / d))
            found += [Path(folder) / f for f in files]
        for path in sorted(found, key=lambda p: os.fsencode(p)):
            if path.is_symlink() or self.exclude(path):
                continue
            try:
                stat = path.lstat()
            except OSError:  # vanished since the walk
                continue
            if not S_ISREG(stat.st_mode):
                continue
            raw = str(path)
            uri = os.fsencode(raw).decode("utf-8", "backslashreplace")
            etag = f"{stat.st_size}-{stat.st_mtime_ns}-{stat.st_ctime_ns}-{stat.st_ino}"
            yield ObjectRef(uri, etag, stat.st_size, raw if uri != raw else "")

    def read(self, ref: ObjectRef) -> bytes:
        return Path(ref.location or ref.uri).read_bytes()


class S3Source:
    """Objects under ``s3://bucket/prefix``, listed with the paginator (1,000 keys a page)."""

    def __init__(self, uri: str, endpoint_url: str | None = None):
        self.bucket, self.prefix = split_s3(uri)
        self.client = s3_client(endpoint_url)

    def list(self) -> Iterator[ObjectRef]:
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix):
                for obj in page.get("Contents", []):
                    if not obj["Key"].endswith("/"):
                        yield ObjectRef(f"s3://{self.bucket}/{obj['Key']}", obj["ETag"].strip('"'), obj["Size"])
        except (BotoCoreError, ClientError) as exc:
            raise _s3_error("listing", f"s3://{self.bucket}/{self.prefix}", exc) from exc

    def read(self, ref: ObjectRef) -> bytes:
        _, key = split_s3(ref.uri)
        try:
            return self.client.get_object(Bucket=self.bucket, Key=key, IfMatch=f'"{ref.etag}"')["Body"].read()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "PreconditionFailed", "412", "404"):
                raise FileNotFoundError(f"{ref.uri} changed or vanished since it was listed") from exc
            raise _s3_error("reading", ref.uri, exc) from exc
        except BotoCoreError as exc:
            raise _s3_error("reading", ref.uri, exc) from exc


def open_source(location: str, endpoint_url: str | None = None, results: Results | None = None) -> LocalSource | S3Source:
    """The content source named by ``location`` (a folder or ``s3://bucket/prefix``); what
    ``results`` writes is never listed as input."""
    if location.startswith("s3://"):
        return S3Source(location, endpoint_url)
    return LocalSource(location, exclude=results.owns if results is not None else (lambda path: False))


class Results:
    """Committed result parts plus the consolidated output: one interface, a local implementation
    (a ``.csv`` / ``.parquet`` file with its parts folder) and an S3 one (a prefix).
    ``Results(output)`` builds the one ``output`` names."""

    output: str

    def __new__(cls, output: str, endpoint_url: str | None = None):
        if cls is Results:
            cls = S3Results if output.startswith("s3://") else LocalResults
        return super().__new__(cls)

    # -- what each store provides -------------------------------------------------------------

    def _part_names(self) -> list[str]:
        raise NotImplementedError

    def _read(self, name: str) -> pd.DataFrame:
        raise NotImplementedError

    def _write_part(self, batch_id: str, data: bytes) -> None:
        raise NotImplementedError

    def _write_output(self, rows: pd.DataFrame) -> None:
        raise NotImplementedError

    def _put(self, name: str, data: bytes) -> str:
        raise NotImplementedError

    def _get(self, name: str) -> bytes | None:
        raise NotImplementedError

    def side_file_name(self, name: str) -> str:
        """``name`` for a side file of these results (see :meth:`LocalResults.owns`)."""
        return safe_file_name(name)

    def owns(self, path: Path) -> bool:
        """Whether ``path`` is something these results write: never input."""
        return False

    def lease(self, timeout_s: float = 3600.0):
        """A context manager that holds the output for one run: a second run on the same output
        waits until the first has committed, so they never score an item twice."""
        raise NotImplementedError

    def check_writable(self) -> None:
        """Fail with one line, before any scoring, when the output cannot be written."""

    # -- shared --------------------------------------------------------------------------------

    def read_all(self) -> pd.DataFrame:
        """Every committed row."""
        frames = [self._read(name) for name in self._part_names()]
        return concat_rows(frames, RESULT_KEY)

    def processed(self) -> set[tuple[str, str, str, str]]:
        """(uri, etag, model, version) of every committed row: what a rerun must not score again."""
        rows = self.read_all()
        return set(zip(*(rows[c].astype(str) for c in RESULT_KEY))) if len(rows) else set()

    def commit(self, batch_id: str, rows: pd.DataFrame) -> None:
        """Make one batch's rows visible atomically (a rename, or a single PUT)."""
        data = io.BytesIO()
        rows.to_parquet(data, index=False)
        self._write_part(batch_id, data.getvalue())

    def consolidate(self) -> pd.DataFrame:
        """Write the current row of every (item, detector version) as the output (atomically) and
        return them: an item overwritten since it was scored (a new ETag) has its newer row only;
        the parts keep the history."""
        rows = self.read_all()
        if len(rows):
            if "scored_at" in rows:
                rows = rows.sort_values("scored_at", kind="stable").drop_duplicates(["uri", "model", "version"], keep="last")
            rows = rows.sort_values(["model", "uri"], kind="stable").reset_index(drop=True)
        self._write_output(rows)
        return rows

    def put(self, name: str, data: bytes) -> str:
        """Store a side file (a report) next to the results; returns where it went.

        ``name`` must be a plain file name (see :func:`safe_file_name`): nothing written here can
        land outside the results' folder or prefix.
        """
        if name != safe_file_name(name):
            raise StorageError(f"{name!r} is not a plain file name; side files stay next to the results")
        return self._put(name, data)

    def get(self, name: str) -> bytes | None:
        """A side file stored by :meth:`put`, or None when there is none."""
        if name != safe_file_name(name):
            raise StorageError(f"{name!r} is not a plain file name; side files stay next to the results")
        return self._get(name)


class LocalResults(Results):
    """Results in a local ``.csv`` / ``.parquet`` file; parts in ``OUTPUT.parts/``."""

    def __init__(self, output: str, endpoint_url: str | None = None):
        self.output = output
        path = Path(output)
        if path.suffix.lower() not in (".csv", ".parquet"):
            raise StorageError(f"output {output} must end in .csv or .parquet, or be an s3:// prefix")
        self.path = path
        self.parts_dir = path.with_name(path.name + ".parts")

    def side_file_name(self, name: str) -> str:
        """On disk a side file's name starts with the output's name, so :meth:`owns` knows it
        even when the output lies inside the input folder."""
        return safe_file_name(f"{self.path.name}.{name}")

    def owns(self, path: Path) -> bool:
        """The output, its parts, side files, temporary files and the lock are never input."""
        name = self.path.name
        return path.resolve().parent == self.path.resolve().parent and path.name.lstrip(".").startswith(name)

    @contextmanager
    def lease(self, timeout_s: float = 3600.0):
        """Hold the output for one run: a second run on the same output waits until the first has
        committed, so they never score an item twice. An advisory lock file next to the output
        (``fcntl.flock``, released by the kernel if the process dies). Stale temporary files of
        killed runs are removed once the lease is held."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock = self.path.with_name(f".{self.path.name}.lock")
        with open(lock, "a") as fh:
            deadline = time.monotonic() + timeout_s
            while True:
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise StorageError(f"another run holds {self.output} for more than {timeout_s:.0f} s; "
                                           f"wait for it or remove {lock} if no run is left") from None
                    time.sleep(0.2)
            try:
                stale = [*self.path.parent.glob(f".{self.path.name}*.tmp")]
                if self.parts_dir.is_dir():
                    stale += self.parts_dir.glob(".*.tmp")
                for path in stale:
                    path.unlink(missing_ok=True)
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def check_writable(self) -> None:
        if self.path.is_dir():
            raise StorageError(f"output {self.output} is a folder; name a .csv or .parquet file")
        parent = self.path.parent
        for folder in (parent, *parent.parents):
            if folder.exists():
                if not folder.is_dir():
                    raise StorageError(f"output {self.output}: {folder} is not a folder")
                if not os.access(folder, os.W_OK):
                    raise StorageError(f"output {self.output}: {folder} is not writable")
                break

    def _part_names(self) -> list[str]:
        return sorted(str(p) for p in self.parts_dir.glob("part-*.parquet")) if self.parts_dir.is_dir() else []

    def _read(self, name: str) -> pd.DataFrame:
        return pd.read_parquet(name)

    def _write_part(self, batch_id: str, data: bytes) -> None:
        atomic_write(self.parts_dir / f"part-{batch_id}.parquet", data)

    def _write_output(self, rows: pd.DataFrame) -> None:
        if self.path.suffix.lower() == ".csv":
            atomic_write(self.path, rows.to_csv(index=False).encode())
        else:
            data = io.BytesIO()
            rows.to_parquet(data, index=False)
            atomic_write(self.path, data.getvalue())

    def _put(self, name: str, data: bytes) -> str:
        return str(atomic_write(self.path.with_name(name), data))

    def _get(self, name: str) -> bytes | None:
        path = self.path.with_name(name)
        return path.read_bytes() if path.is_file() else None


class S3Results(Results):
    """Results under ``s3://bucket/prefix``: parts in ``PREFIX/parts/``, the output ``PREFIX/results.parquet``."""

    def __init__(self, output: str, endpoint_url: str | None = None):
        self.output = output
        self.bucket, prefix = split_s3(output)
        self.prefix = prefix.rstrip("/") + "/" if prefix else ""
        self.client = s3_client(endpoint_url)

    @contextmanager
    def lease(self, timeout_s: float = 3600.0, ttl_s: float = LEASE_TTL_S):
        """Hold the output for one run with a lease object ``PREFIX/.lease``, created by a
        conditional PUT (``If-None-Match: *``): of two runs, one creates it and the other waits.
        The holder renews it every ``ttl_s / 3`` seconds (``If-Match`` its own ETag); a lease left
        by a killed run expires after ``ttl_s`` and is then taken over, again conditionally."""
        key = f"{self.prefix}.lease"
        owner = uuid.uuid4().hex
        deadline = time.monotonic() + timeout_s
        etag = [self._acquire(key, owner, ttl_s)]
        while etag[0] is None:
            if time.monotonic() > deadline:
                raise StorageError(f"another run holds {self.output} for more than {timeout_s:.0f} s; wait for it or "
                                   f"delete s3://{self.bucket}/{key} if no run is left")
            time.sleep(1.0)
            etag[0] = self._acquire(key, owner, ttl_s)
        done = threading.Event()

        def renew() -> None:
            while not done.wait(ttl_s / 3):
                try:
                    etag[0] = self.client.put_object(Bucket=self.bucket, Key=key, Body=_lease_body(owner, ttl_s),
                                                     IfMatch=etag[0])["ETag"]
                except (BotoCoreError, ClientError):  # lost: the run's commits stay correct, only exclusivity ends
                    return

        renewer = threading.Thread(target=renew, name="s3-lease", daemon=True)
        renewer.start()
        try:
            yield
        finally:
            done.set()
            renewer.join()
            try:
                self.client.delete_object(Bucket=self.bucket, Key=key, IfMatch=etag[0])
            except (BotoCoreError, ClientError):  # expired and taken over, or the store is down: it expires
                pass

    def _acquire(self, key: str, owner: str, ttl_s: float) -> str | None:
        """The new lease's ETag, or None while another run holds an unexpired one."""
        try:
            return self.client.put_object(Bucket=self.bucket, Key=key, Body=_lease_body(owner, ttl_s),
                                          IfNoneMatch="*")["ETag"]
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("PreconditionFailed", "ConditionalRequestConflict"):
                raise _s3_error("taking the lease on", self.output, exc) from exc
        except BotoCoreError as exc:
            raise _s3_error("taking the lease on", self.output, exc) from exc
        try:
            held = self.client.get_object(Bucket=self.bucket, Key=key)
            if json.loads(held["Body"].read())["expires"] > time.time():
                return None
            return self.client.put_object(Bucket=self.bucket, Key=key, Body=_lease_body(owner, ttl_s),
                                          IfMatch=held["ETag"])["ETag"]
        except ClientError as exc:  # released or taken over meanwhile: try again
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "PreconditionFailed",
                                                                "ConditionalRequestConflict"):
                return None
            raise _s3_error("taking the lease on", self.output, exc) from exc
        except (BotoCoreError, ValueError, KeyError) as exc:
            raise StorageError(f"the lease s3://{self.bucket}/{key} cannot be read ({exc}); delete it if no run "
                               "is left") from exc

    def _part_names(self) -> list[str]:
        names = []
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=f"{self.prefix}parts/"):
                names += [o["Key"] for o in page.get("Contents", []) if o["Key"].endswith(".parquet")]
        except (BotoCoreError, ClientError) as exc:
            raise _s3_error("listing results in", self.output, exc) from exc
        return sorted(names)

    def _read(self, name: str) -> pd.DataFrame:
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=name)["Body"].read()
        except (BotoCoreError, ClientError) as exc:
            raise _s3_error("reading", f"s3://{self.bucket}/{name}", exc) from exc
        return pd.read_parquet(io.BytesIO(body))

    def _put_object(self, key: str, data: bytes, action: str) -> str:
        try:
            self.client.put_object(Bucket=self.bucket, Key=key, Body=data)
        except (BotoCoreError, ClientError) as exc:
            raise _s3_error(action, f"s3://{self.bucket}/{key}", exc) from exc
        return f"s3://{self.bucket}/{key}"

    def _write_part(self, batch_id: str, data: bytes) -> None:
        self._put_object(f"{self.prefix}parts/part-{batch_id}.parquet", data, "writing results to")

    def _write_output(self, rows: pd.DataFrame) -> None:
        data = io.BytesIO()
        rows.to_parquet(data, index=False)
        self._put_object(f"{self.prefix}results.parquet", data.getvalue(), "writing results to")

    def _put(self, name: str, data: bytes) -> str:
        return self._put_object(f"{self.prefix}{name}", data, "writing")

    def _get(self, name: str) -> bytes | None:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=f"{self.prefix}{name}")["Body"].read()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise _s3_error("reading", f"s3://{self.bucket}/{self.prefix}{name}", exc) from exc
        except BotoCoreError as exc:
            raise _s3_error("reading", f"s3://{self.bucket}/{self.prefix}{name}", exc) from exc


def concat_rows(frames: list[pd.DataFrame], columns: list[str]) -> pd.DataFrame:
    """Result rows of several batches as one frame (``columns`` when there are none). A batch whose
    rows are all errors has all-NaN score columns; pandas' current rule (they do not decide the
    column's dtype) is the one wanted here, so its warning about a future change is not shown."""
    if not frames:
        return pd.DataFrame(columns=columns)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The behavior of DataFrame concatenation with empty or all-NA",
                                FutureWarning)
        return pd.concat(frames, ignore_index=True)


def _lease_body(owner: str, ttl_s: float) -> bytes:
    return json.dumps({"owner": owner, "host": socket.gethostname(), "pid": os.getpid(),
                       "expires": time.time() + ttl_s}).encode()


def safe_file_name(text: str, max_length: int = 200) -> str:
    """``text`` as a plain file name: letters, digits, ``.``, ``_``, ``-`` only, never ``.``/``..`` or hidden."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", text)[:max_length].lstrip(".")
    return name or "_"


def open_results(output: str, endpoint_url: str | None = None) -> Results:
    return Results(output, endpoint_url)
