"""End-to-end throughput of ``attribute_stream``: from listing objects to committed results.

Onboards the demo's shipped generator (DCGAN 32x32 grayscale, width 32) with ``flipad onboard``'s
default detector and search (reconstruction loss, encoder-lm; ``--encoder-steps`` as onboarding's
default; the open-world evaluation skipped: it does not change the detector) in a temporary
embedded MLflow store, then scores the same N images, half the generator's own new samples and
half real test images, from a local folder and from an S3 bucket served by moto on 127.0.0.1
(real boto3 calls), and prints images per second for each, in all and per CPU thread torch uses.
The moto server runs in a process of its own on the same cores; for the S3 run the bench also
prints the CPU seconds that server used and the rate per core left to the attribution
(``items / (seconds * threads - server CPU seconds)``), what a remote S3 would leave.
Runs on CUDA when present (``--device``). Its environment (a temporary working folder, its own
Prefect home and embedded MLflow store) is its own: run it as ``python -m bench``'s subprocess.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import psutil

from flows.processes import free_port, spawn, stop, wait_http

from .report import Benchmark, markdown_table


def server_cpu(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far."""
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def run(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench attribute_throughput", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--encoder-steps", type=int, default=1000)
    parser.add_argument("--search-method", choices=("encoder-lm", "adam"), default="encoder-lm",
                        help="adam: the earlier search, as the baseline")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="flipad-bench-"))
    os.chdir(work)
    os.environ.update(PREFECT_HOME=str(work / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
                      MLFLOW_DISABLE_TELEMETRY="true", PREFECT_LOGGING_LEVEL="WARNING")
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    import boto3
    import numpy as np
    import torch

    from flipad.device import resolve_device
    from flipad.io.data import encode_item
    from flows.datasets import load_fashion_mnist
    from flows.attribute import AttributeConfig, attribute_stream
    from flows.demo import DEMO_GENERATOR, SHIPPED
    from flows.onboard import OnboardConfig, onboard_generator

    device = resolve_device(args.device)
    weights = SHIPPED / "generator-seed0-steps1000.safetensors"
    real = load_fashion_mnist("train", 32, limit=600)
    np.save(work / "real.npy", real)
    start = time.perf_counter()
    onboarded = onboard_generator(OnboardConfig(
        name="bench", generator="dcgan", weights=str(weights), generator_kwargs=DEMO_GENERATOR, real=str(work / "real.npy"),
        num_samples=300, num_validation=200, num_test=100, open_world=False, device=str(device),
        family_settings={"reconstruction": {"encoder_steps": args.encoder_steps, "method": args.search_method}},
    ))
    onboard_s = time.perf_counter() - start
    print(f"onboarded a detector in {onboard_s:.1f} s (weights: {weights.name})")

    half = args.items // 2
    images = [*onboarded.detector.generate(half, seed=123), *load_fashion_mnist("test", 32, limit=args.items - half)]
    payloads = [encode_item(x) for x in images]
    folder = work / "stream"
    folder.mkdir()
    for i, data in enumerate(payloads):
        (folder / f"{i:06d}.png").write_bytes(data)

    port = free_port()
    server = spawn("moto", [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], work / "moto.log",
                   dict(os.environ))
    wait_http(f"http://127.0.0.1:{port}/moto-api/", 60, server)
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    endpoint = f"http://127.0.0.1:{port}"
    s3 = boto3.client("s3", endpoint_url=endpoint)
    s3.create_bucket(Bucket="bench")
    for i, data in enumerate(payloads):
        s3.put_object(Bucket="bench", Key=f"in/{i:06d}.png", Body=data)

    threads = 1 if device.type == "cuda" else torch.get_num_threads()
    print(f"device {device}, {len(payloads)} PNG images of 32x32 (half own, half real), batch size {args.batch_size}, "
          f"{threads} torch threads")
    runs = {
        "folder -> csv": AttributeConfig(models=("bench",), input=str(folder), output=str(work / "out.csv"),
                                         batch_size=args.batch_size, monitor=False),
        "s3 -> s3 (moto)": AttributeConfig(models=("bench",), input="s3://bench/in/", output="s3://bench/out/",
                                           batch_size=args.batch_size, endpoint_url=endpoint, monitor=False),
    }
    rows = []
    for name, config in runs.items():
        before = server_cpu(server.pid)
        result = attribute_stream(config)
        assert result.new_rows == len(payloads), result.new_rows
        rate = result.new_rows / result.seconds
        print(f"{name:18s} {result.new_rows} items in {result.seconds:6.1f} s = {rate:7.1f} images/s "
              f"({rate / threads:.1f} per thread)")
        left = None
        if config.endpoint_url:
            used = server_cpu(server.pid) - before
            left = result.new_rows / (result.seconds * threads - used)
            print(f"{name:18s} the S3 server used {used:.1f} CPU s: {left:.1f} images/s per core left to the attribution")
        again = attribute_stream(config)
        print(f"{name:18s} rerun (nothing new): {again.seconds:.1f} s, {again.new_rows} new rows")
        rows.append({"run": name, "items": result.new_rows, "seconds": result.seconds, "images per s": rate,
                     "per thread": rate / threads, "per core left by the S3 server": left,
                     "rerun s (nothing new)": again.seconds, "rerun new rows": again.new_rows})
    stop(server)
    return {"device": str(device), "threads": threads, "batch_size": args.batch_size, "method": args.search_method,
            "encoder_steps": args.encoder_steps, "onboard_s": onboard_s, "rows": rows}


def render(figures: dict) -> str:
    return (f"Device {figures['device']}, {figures['threads']} torch threads, batch size {figures['batch_size']}; "
            f"search {figures['method']} (encoder {figures['encoder_steps']} batches); half own items, half real, "
            f"32x32 PNG; onboarding took {figures['onboard_s']:.0f} s.\n\n"
            + markdown_table(figures["rows"], formats={"seconds": ".1f", "images per s": ".1f", "per thread": ".1f",
                                                       "per core left by the S3 server": ".1f",
                                                       "rerun s (nothing new)": ".1f"}))


def headline(figures: dict) -> list[str]:
    folder = figures["rows"][0]
    return [f"Attribution of a folder, end to end: {folder['images per s']:.0f} items/s on {figures['threads']} "
            f"threads ({folder['per thread']:.1f} per thread), {figures['device']}"]


BENCHMARK = Benchmark("attribute_throughput", __doc__, run, render, headline,
                      quick=("--items", "20", "--batch-size", "10", "--encoder-steps", "20"))
