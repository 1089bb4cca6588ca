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
Runs on CUDA when present (``--device``).

    python bench/attribute_throughput.py [--items 1000] [--batch-size 256] [--encoder-steps 1000]
                                         [--search-method encoder-lm|adam] [--device auto]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flows.processes import free_port, spawn, stop, wait_http  # noqa: E402


def server_cpu(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far."""
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--encoder-steps", type=int, default=1000)
    parser.add_argument("--search-method", choices=("encoder-lm", "adam"), default="encoder-lm",
                        help="adam: the earlier search, as the baseline")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

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
    print(f"onboarded a detector in {time.perf_counter() - start:.1f} s (weights: {weights.name})")

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
    for name, config in runs.items():
        before = server_cpu(server.pid)
        result = attribute_stream(config)
        assert result.new_rows == len(payloads), result.new_rows
        rate = result.new_rows / result.seconds
        print(f"{name:18s} {result.new_rows} items in {result.seconds:6.1f} s = {rate:7.1f} images/s "
              f"({rate / threads:.1f} per thread)")
        if config.endpoint_url:
            used = server_cpu(server.pid) - before
            left = result.new_rows / (result.seconds * threads - used)
            print(f"{name:18s} the S3 server used {used:.1f} CPU s: {left:.1f} images/s per core left to the attribution")
        again = attribute_stream(config)
        print(f"{name:18s} rerun (nothing new): {again.seconds:.1f} s, {again.new_rows} new rows")
    stop(server)


if __name__ == "__main__":
    main()
