"""The demo as users meet it: a real server process, its API through gradio_client, and a real browser."""

import io
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from demo.launch import start_demo
from tests.test_spec_and_images import bomb_png

ROOT = Path(__file__).resolve().parents[1]
CLASSES = {"blank", "circle", "stripes"}


def tmp_cache(run: Path) -> Path:
    return run.parent / "gradio-cache"


def cache_files(run: Path) -> int:
    return sum(1 for p in tmp_cache(run).rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def server(exported_run):
    log = exported_run.parent / "demo.log"
    proc, url = start_demo(
        ["--model", str(exported_run), "--queue-size", "8"], log, tmp_cache(exported_run), exported_run.parents[2]
    )
    yield url, exported_run
    proc.terminate()  # SIGTERM, as docker/systemd stop it: a clean shutdown that empties the upload cache
    assert proc.wait(30) == 0
    assert cache_files(exported_run) == 0, (exported_run.parent / "demo.log").read_text()[-1000:]


@pytest.fixture(scope="module")
def client(server):
    from gradio_client import Client

    return Client(server[0], verbose=False)


def images(run: Path) -> list[Path]:
    return sorted((run.parent.parent.parent / "data").rglob("*.png"))


ALL = ["pytorch", "torchscript", "onnx_fp32", "onnx_int8", "executorch", "executorch_int8", "litert", "litert_int8"]


@pytest.mark.slow  # a real server process
def test_api_predict_every_backend(client, server):
    from gradio_client import handle_file

    for img in images(server[1])[::12][:3]:
        label, table, badge = client.predict(handle_file(str(img)), None, "m", ALL, 3, api_name="/predict")
        assert label["label"] in CLASSES and len(label["confidences"]) == 3
        rows = table["data"]
        assert [r[0] for r in rows] == ALL
        assert all(r[1] in CLASSES and r[3] >= 0 and r[4] > 0 for r in rows)  # preprocess ms, inference ms
        fp32 = {r[0]: r[1] for r in rows}
        assert fp32["pytorch"] == fp32["onnx_fp32"] == fp32["torchscript"] == fp32["executorch"] == fp32["litert"]
        tops = {r[0]: r[1] for r in rows}
        if len(set(tops.values())) == 1:  # the badge states what the table shows
            assert badge.startswith(f"✅ all backends agree on **{rows[0][1]}**")
        else:
            assert badge.startswith("⚠️ backends disagree: ") and all(f"{b} → {t}" in badge for b, t in tops.items())


def malformed(tmp: Path) -> dict[str, Path]:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 30)).save(buf, "PNG")
    files = {
        "text.jpg": b"<html>not an image</html>",
        "zero.png": b"",
        "bomb.png": bomb_png(13000, 13000),
        "truncated.png": buf.getvalue()[:120],
    }
    for name, data in files.items():
        (tmp / name).write_bytes(data)
    return {n: tmp / n for n in files}


@pytest.mark.slow  # a real server process
def test_api_malformed_uploads_get_clear_errors_and_server_keeps_serving(client, server, tmp_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    expected = {
        "text.jpg": "not a supported image",
        "zero.png": "empty",
        "bomb.png": "MP",
        "truncated.png": "truncated",
    }
    for name, path in malformed(tmp_path).items():
        t = time.perf_counter()
        with pytest.raises(AppError, match=expected[name]):
            client.predict(handle_file(str(path)), None, "m", ["onnx_fp32"], 3, api_name="/predict")
        assert time.perf_counter() - t < 5
    label, _, _ = client.predict(
        handle_file(str(images(server[1])[0])), None, "m", ["onnx_int8"], 1, api_name="/predict"
    )
    assert label["label"] in CLASSES


@pytest.mark.slow  # a real server process
def test_api_answers_the_whole_malformed_corpus(client, server, tmp_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    from tools.malformed_corpus import build

    for case, path in build(tmp_path):
        t = time.perf_counter()
        if case.expect == "ok":
            label, _, _ = client.predict(handle_file(str(path)), None, "m", ["onnx_fp32"], 2, api_name="/predict")
            assert label["label"] in CLASSES, case.name
        else:
            # gradio_client checks the size cap before uploading; the server enforces it too (below)
            match = "maximum file size" if case.name.startswith("oversized") else case.match
            with pytest.raises((AppError, ValueError), match=match) as e:
                client.predict(handle_file(str(path)), None, "m", ["onnx_fp32"], 2, api_name="/predict")
            assert "Traceback" not in str(e.value), case.name
        assert time.perf_counter() - t < 3.0, case.name  # 1 s of work + the HTTP round trips
    label, _, _ = client.predict(handle_file(str(images(server[1])[0])), None, "m", ["pytorch"], 1, api_name="/predict")
    assert label["label"] in CLASSES  # still serving


@pytest.mark.slow  # a real server process
def test_repeated_uploads_do_not_pile_up_temp_files(client, server):
    from gradio_client import handle_file

    img = images(server[1])[1]
    client.predict(handle_file(str(img)), None, "m", ["onnx_fp32"], 1, api_name="/predict")
    before = cache_files(server[1])
    for _ in range(10):
        client.predict(handle_file(str(img)), None, "m", ["onnx_fp32"], 1, api_name="/predict")
    assert cache_files(server[1]) == before  # same content -> same cached file; nothing per request


@pytest.mark.slow
@pytest.mark.parametrize("client_kind", ["gradio", "http"])
def test_loadtest_clients_drive_the_real_predict_path(server, client_kind):
    from demo.loadtest import run_level

    r = run_level(server[0], str(images(server[1])[2]), "m", "onnx_fp32", 2, 2.0, client_kind)
    assert r["ok"] >= 2 and r["errors"] == 0, r["first_error"]
    assert r["server_p50_ms"] > 0 and r["p50_ms"] >= r["server_p50_ms"]  # the app's own timing came back


@pytest.mark.slow  # a real server process
def test_server_refuses_oversized_upload_itself(server):
    import httpx

    big = b"\x89PNG\r\n\x1a\n" + b"\0" * (11 * 2**20)  # over --max-file-mb 10, sent without gradio_client
    r = httpx.post(server[0] + "gradio_api/upload", files={"files": ("big.png", big, "image/png")}, timeout=30)
    assert r.status_code == 413 and "maximum" in r.text.lower()


@pytest.mark.slow  # a real server process
def test_api_compare_benchmark_and_card(client, server):
    from gradio_client import handle_file

    out = client.predict(handle_file(str(images(server[1])[5])), "m", api_name="/compare")
    labels, times = out[0::2], out[1::2]
    assert all(lab["label"] in CLASSES for lab in labels) and all("inference" in t for t in times)
    table, _ = client.predict("m", 8, api_name="/benchmark")
    assert [r[0] for r in table["data"]] == ALL and all(r[2] >= 90 for r in table["data"][:3])
    card = client.predict("m", api_name="/model_card")
    assert "cnn_small" in card and "Export validation" in card


@pytest.mark.slow
@pytest.mark.browser
def test_browser_upload_classify_and_compare(server):
    from playwright.sync_api import sync_playwright

    url, run = server
    shots = ROOT / "artifacts" / "screenshots"
    shots.mkdir(parents=True, exist_ok=True)
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
    ]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=flags)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(url, wait_until="networkidle")  # the Svelte app must be hydrated before files are set
        page.locator("#classify").wait_for(timeout=30_000)
        first = images(run)[0]
        page.locator("#upload input[type=file]").set_input_files(str(first))
        page.locator("#upload").get_by_text(first.name).wait_for(timeout=60_000)  # upload finished
        page.locator("#classify").click()
        page.wait_for_function("() => /agree/.test(document.querySelector('#badge')?.innerText || '')", timeout=30_000)
        assert any(c in page.locator("#label").inner_text() for c in CLASSES)
        page.screenshot(path=str(shots / "predict.png"), full_page=True)
        page.get_by_role("tab", name="Compare").click()
        other = images(run)[13]
        page.locator("#compare-upload input[type=file]").set_input_files(str(other))
        page.locator("#compare-upload").get_by_text(other.name).wait_for(timeout=60_000)
        page.locator("#compare-go").click()
        # gradio puts elem_classes on a wrapper and on the inner element: count the innermost ones
        inner = "[...document.querySelectorAll('.compare-time')].filter(e => !e.querySelector('.compare-time'))"
        from demo.backends import BACKENDS

        shown = f"() => {inner}.filter(e => /inference/.test(e.innerText)).length === {len(BACKENDS)}"
        page.wait_for_function(shown, timeout=30_000)
        labels = page.evaluate(
            "() => [...document.querySelectorAll('.compare-label')]"
            ".filter(e => !e.querySelector('.compare-label')).map(e => e.innerText)"
        )
        assert len(labels) == len(BACKENDS) and all(any(c in t for c in CLASSES) for t in labels)
        page.screenshot(path=str(shots / "compare.png"), full_page=True)
        browser.close()


def test_agreement_badge_names_disagreements_and_backends_outside_their_budget():
    from demo.app import agreement_badge
    from demo.backends import Prediction

    agree = [Prediction("onnx_fp32", [("cat", 0.9)], 1.0), Prediction("onnx_int8", [("cat", 0.8)], 0.5)]
    assert agreement_badge(agree, {}) == "✅ all backends agree on **cat**"
    caveat = {"onnx_int8": "onnx_int8 was written with --force outside its accuracy budget"}
    assert agreement_badge(agree, caveat).endswith("⚠️ " + caveat["onnx_int8"])
    assert "outside" not in agreement_badge(agree[:1], caveat)  # only for backends that answered
    differ = [agree[0], Prediction("onnx_int8", [("dog", 0.6)], 0.5)]
    assert agreement_badge(differ, {}) == "⚠️ backends disagree: onnx_fp32 → cat, onnx_int8 → dog"


def test_empty_phone_int8_columns_say_why(tmp_path):
    """A refused INT8 .pte/.tflite shows the export's figures; one the export never tried names the opt-in flag;
    a format the export skipped altogether stays 'not exported'."""
    import json

    from core.models import default_spec
    from demo.app import not_served
    from demo.backends import ServedModel

    refused = {"fits": False, "agreement": 40.54, "drop": 43.92, "config": "pt2e-LiteRT-S8-pc"}
    (tmp_path / "export.json").write_text(json.dumps({"executorch": {}, "litert": {}, "litert_int8": refused}))
    m = ServedModel("m", None, tmp_path, default_spec("cnn_small", ("a", "b"), image_size=8))
    assert not_served(m, "litert_int8") == (
        "INT8 refused: 40.5 % top-1 agreement with fp32, +43.9 pt (pt2e-LiteRT-S8-pc) on the validation images"
    )
    assert not_served(m, "executorch_int8") == "not exported (opt-in: export/to_onnx.py --executorch-int8)"
    (tmp_path / "export.json").write_text(json.dumps({"litert": {}}))
    m = ServedModel("m", None, tmp_path, m.spec)
    assert not_served(m, "executorch_int8") == "not exported"


def test_backends_run_onnx_first_and_answer_in_the_order_asked(tmp_path):
    """PyTorch's OpenMP threads keep spinning after a call and slowed the next ONNX Runtime call 2-3x: the demo
    runs ONNX backends first (its sessions stop spinning when a run returns), then the PyTorch ones, and still
    answers in the order asked."""
    import numpy as np

    from core.models import default_spec
    from demo.backends import ServedModel, run_backends

    calls = []

    class FakeRunners:
        def get(self, m, backend):
            return lambda x: (calls.append(backend), np.array([[0.0, 1.0]]))[1]

    spec = default_spec("cnn_small", ("a", "b"), image_size=8)
    m = ServedModel("m", None, None, spec)
    asked = ["pytorch", "torchscript", "onnx_fp32", "onnx_int8"]
    preds = run_backends(FakeRunners(), m, asked, np.zeros((1, 3, 8, 8), np.float32), 1)
    assert calls == ["onnx_fp32", "onnx_int8", "pytorch", "torchscript"]
    assert [p.backend for p in preds] == asked and all(p.top[0][0] == "b" for p in preds)


def test_demo_onnx_sessions_stop_spinning_after_each_run(exported_run):
    from demo.backends import Runners, ServedModel
    from export.runtime import OnnxClassifier

    path = exported_run / "export" / "model.onnx"
    spec = OnnxClassifier(path).spec
    runners = Runners(threads=1)
    runners.get(ServedModel("m", None, None, spec, onnx_only=path), "onnx_fp32")
    (clf_logits,) = runners._cache.values()
    opts = clf_logits.__self__.session.get_session_options()
    assert opts.get_session_config_entry("session.force_spinning_stop") == "1"


def test_model_dropdown_opens_on_the_newest_exported_run(trained_run, tmp_path):
    import shutil

    from demo.backends import discover

    for name, mtime in (("old", 1_000_000), ("new", 2_000_000)):
        d = tmp_path / "runs" / name
        d.mkdir(parents=True)
        shutil.copy(trained_run / "best.pt", d / "best.pt")
        os.utime(d / "best.pt", (mtime, mtime))
    (tmp_path / "runs" / "old" / "export").mkdir()
    assert list(discover(tmp_path, None)) == ["old", "new"]  # the newer run has only its PyTorch backend
    shutil.rmtree(tmp_path / "runs" / "old" / "export")
    assert list(discover(tmp_path, None)) == ["new", "old"]  # nothing exported: newest first, as before


def test_demo_serves_from_the_one_artifacts_root(tmp_path):
    """CLS_ARTIFACTS moves every stage's artifacts, the demo's discovery included."""
    code = "import demo.app as a, training.runs as r; print(a.ARTIFACTS is r.ARTIFACTS, a.RUNS)"
    env = {**os.environ, "CLS_ARTIFACTS": str(tmp_path / "elsewhere"), "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["True", str(tmp_path / "elsewhere" / "runs")], out.stderr[-500:]
