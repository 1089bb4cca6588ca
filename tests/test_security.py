"""Secrets stay out of MLflow; side files stay inside the results' folder or prefix."""

from __future__ import annotations

import pytest

from flows.storage import Results, StorageError, safe_file_name
from registry.redact import REDACTED, redact_params, redact_url


def test_urls_lose_passwords_and_secret_query_values():
    assert redact_url("http://user:hunter2@minio:9000/bucket") == f"http://user:{REDACTED}@minio:9000/bucket"
    assert redact_url("https://hooks.example.com/x?token=abc&channel=ops") == f"https://hooks.example.com/x?token={REDACTED}&channel=ops"
    assert redact_url("s3://bucket/prefix/") == "s3://bucket/prefix/"
    assert redact_url("/data/real.npy") == "/data/real.npy"


def test_params_with_secret_names_are_masked_recursively():
    params = {"real": "/data/x.npy", "aws_secret_access_key": "abc", "generator_kwargs.api_key": "k",
              "negatives": ["https://u:p@host/neg.npy"], "num_samples": 3, "token": ""}
    out = redact_params(params)
    assert out["aws_secret_access_key"] == REDACTED and out["generator_kwargs.api_key"] == REDACTED
    assert out["negatives"] == [f"https://u:{REDACTED}@host/neg.npy"]
    assert out["real"] == "/data/x.npy" and out["num_samples"] == 3 and out["token"] == ""
    assert "abc" not in str(out) and ":p@" not in str(out)


@pytest.mark.parametrize("name", ["../../etc/passwd", "a/b.html", "..", ".hidden", "x\\..\\y", "drift-m/../../v1.html"])
def test_side_file_names_cannot_escape(name, tmp_path):
    results = Results(str(tmp_path / "out" / "results.csv"))
    with pytest.raises(StorageError, match="plain file name"):
        results.put(name, b"x")
    safe = safe_file_name(name)
    assert "/" not in safe and "\\" not in safe and not safe.startswith(".")
    where = results.put(safe, b"x")
    assert (tmp_path / "out" / safe).read_bytes() == b"x" and where == str(tmp_path / "out" / safe)
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == [safe]
