"""Monitoring that alarms on trouble, never on re-saved content (a real onboarding of the demo's
generator with the default detector at reduced sizes, a real MLflow server and Prefect harness)."""

from __future__ import annotations

import http.server
import io
import json
import threading

import numpy as np
import pandas as pd
import pytest
import scipy.stats
from mlflow.tracking import MlflowClient
from PIL import Image

from flipad.generators.challengers import build_challengers
from flipad.generators.sampling import generate_samples
from flipad.io.data import encode_item
from flows import demo
from flows.attribute import AttributeConfig, attribute_stream
from monitoring.monitors import ALPHA, MONITORS, run_monitors

MODEL = "demo-default"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def onboarded(demo_onboarded):
    return demo_onboarded


def _rows(model, items: list[bytes]) -> pd.DataFrame:
    return pd.DataFrame([r.as_row() for r in model.score_bytes(items)])


def _jpeg(image: np.ndarray, quality: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image[0]).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _png_of_jpeg(image: np.ndarray, quality: int) -> bytes:
    return encode_item(np.asarray(Image.open(io.BytesIO(_jpeg(image, quality))))[None])


def _alarms(reference: pd.DataFrame, rows: pd.DataFrame) -> dict[str, str]:
    return {m.name: m.sentence for m in run_monitors(reference, rows) if m.alarm}


@pytest.fixture(scope="module")
def calm_pool(onboarded, fashion_test) -> pd.DataFrame:
    """Rows of content that should not alarm: fresh own items pristine, JPEG q90/q80/q70 and PNG
    of JPEG q80, real images the onboarding never saw, and the look-alike (another seed)."""
    result, model, _, other = onboarded
    own = result.detector.generate(500, seed=777)
    lookalike = generate_samples(other, demo.DEMO_LATENT, 150, 5, result.detector.sample_range)
    items = [*map(encode_item, own[:100]), *[_jpeg(x, 90) for x in own[100:200]], *[_jpeg(x, 80) for x in own[200:300]],
             *[_jpeg(x, 70) for x in own[300:400]], *[_png_of_jpeg(x, 80) for x in own[400:500]],
             *map(encode_item, fashion_test[500:800]), *map(encode_item, lookalike)]
    rows = _rows(model, items)
    rows["source"] = ["own"] * 500 + ["real"] * 300 + ["lookalike"] * 150
    return rows


def test_a_stream_like_the_demos_raises_no_alarm(onboarded, calm_pool):
    _, _, reference, _ = onboarded
    assert (calm_pool["verdict"][calm_pool["source"] == "own"] == "attributed").mean() >= 0.97
    assert (calm_pool["verdict"][calm_pool["source"] != "own"] == "attributed").mean() <= 0.01
    stream = pd.concat([calm_pool, pd.DataFrame([r.as_row() for r in onboarded[1].score_bytes([b"broken"])])])
    results = run_monitors(reference, stream)
    assert [m.name for m in results] == list(MONITORS)
    assert not any(m.alarm for m in results), [m.sentence for m in results]
    assert all(m.sentence and np.isfinite(m.value) for m in results)


def test_repeated_calm_windows_alarm_no_more_than_stated(onboarded, calm_pool):
    """Windows of 300 items with every mix of own, real and look-alike content (the mix is the
    stream's business): the alarm rate per window stays within the stated 5 x ALPHA."""
    _, _, reference, _ = onboarded
    rng = np.random.default_rng(0)
    windows, alarmed = 150, 0
    for _ in range(windows):
        own_share = rng.uniform(0.05, 0.95)
        own = calm_pool[calm_pool["source"] == "own"].sample(round(300 * own_share), replace=True, random_state=rng)
        rest = calm_pool[calm_pool["source"] != "own"].sample(300 - len(own), replace=True, random_state=rng)
        alarmed += bool(_alarms(reference, pd.concat([own, rest])))
    stated = len(MONITORS) * ALPHA
    allowed = scipy.stats.binom.ppf(0.999, windows, stated)
    print(f"false alarms: {alarmed} of {windows} calm windows (stated at most {stated:.3f} per window)")
    assert alarmed <= allowed


def test_heavy_compression_alarms_and_names_compression(onboarded, calm_pool):
    result, model, reference, _ = onboarded
    own = result.detector.generate(150, seed=901)
    heavy = _rows(model, [_jpeg(x, 40) for x in own])
    assert (heavy["verdict"] == "undecided").all() and heavy["reason"].str.contains("estimated quality 40").all()
    stream = pd.concat([calm_pool[calm_pool["source"] != "own"], heavy])
    alarms = _alarms(reference, stream)
    assert set(alarms) == {"undecided"} and "more compressed than calibrated" in alarms["undecided"], alarms


def test_a_fine_tuned_copy_in_a_tenth_of_the_stream_alarms_as_a_near_miss(onboarded, calm_pool, fashion_train):
    """A copy of the owner's generator trained two further GAN steps on real data: its items are
    rejected, but closer to the threshold than real images and other generators get."""
    result, model, reference, _ = onboarded
    copy = build_challengers(result.detector.module, demo.DEMO_LATENT, fashion_train[:2000], result.detector.sample_range,
                             99, train_steps=2, kinds=("finetuned",))["finetuned"]
    copied = _rows(model, list(map(encode_item, generate_samples(copy, demo.DEMO_LATENT, 100, 6, result.detector.sample_range))))
    stream = pd.concat([calm_pool, copied])
    alarms = _alarms(reference, stream)
    assert "near-miss" in alarms and "a near-miss cluster" in alarms["near-miss"], alarms
    assert "compression" not in alarms


def test_corrupt_items_and_a_new_size_alarm_on_their_own_monitors(onboarded, calm_pool):
    _, model, reference, _ = onboarded
    calm = calm_pool.sample(900, random_state=1)
    corrupt = _rows(model, [b"\x89PNG\r\n\x1a\n truncated"] * 100)
    alarms = _alarms(reference, pd.concat([calm, corrupt]))
    assert set(alarms) == {"unreadable"} and "10% of items are error rows" in alarms["unreadable"], alarms
    resized = _rows(model, [encode_item(np.full((1, 48, 48), 128, np.uint8))] * 100)
    alarms = _alarms(reference, pd.concat([calm, resized]))
    assert set(alarms) == {"input-size"} and "48x48 (100)" in alarms["input-size"] and "32x32" in alarms["input-size"]


def test_undecided_reaches_the_flows_rows_the_served_answer_and_the_monitoring_run(onboarded, tmp_path):
    result, model, _, _ = onboarded
    own = result.detector.generate(40, seed=902)
    folder = tmp_path / "in"
    folder.mkdir()
    for i, x in enumerate(own):
        (folder / f"{i:03d}-q{90 if i % 2 else 50}.jpg").write_bytes(_jpeg(x, 90 if i % 2 else 50))
    answer = model.predict(None, pd.DataFrame({"image": [__import__("base64").b64encode(_jpeg(own[0], 50)).decode()]}))
    assert answer.loc[0, "verdict"] == "undecided" and pd.isna(answer.loc[0, "is_generated"])
    assert "below the lowest the thresholds were calibrated on (70)" in answer.loc[0, "reason"]
    posted: list[dict] = []

    class Hook(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (the handler's API)
            posted.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    hook = http.server.HTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    try:
        done = attribute_stream(AttributeConfig(models=(MODEL,), input=str(folder), output=str(tmp_path / "rows.csv"),
                                                webhook=f"http://127.0.0.1:{hook.server_port}/alarm"))
    finally:
        hook.shutdown()
    rows = done.rows.set_index(done.rows["uri"].str.rsplit("/", n=1).str[-1])
    assert (rows.loc[rows.index.str.contains("q50"), "verdict"] == "undecided").all()
    assert (rows.loc[rows.index.str.contains("q90"), "verdict"] == "attributed").mean() >= 0.95
    summary = done.drift[MODEL]
    assert summary["alarm"] and any("more compressed than calibrated" in s for s in summary["alarms"])
    # the alarm's sentence reaches the webhook and the MLflow monitoring run's description and metrics
    assert len(posted) == 1 and posted[0]["model"] == MODEL and posted[0]["alarms"] == summary["alarms"]
    client = MlflowClient()
    experiment = client.get_experiment_by_name(f"flipad/{MODEL}/monitoring")
    (run,) = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)
    assert summary["alarms"][0] in run.data.tags["mlflow.note.content"]
    assert run.data.metrics["alarm"] == 1.0 and run.data.metrics["monitor_undecided_alarm"] == 1.0
