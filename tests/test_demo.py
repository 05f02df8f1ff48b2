"""The Gradio demo: its backends and page content, and the page itself in real headless Chromium against real TorchServe."""

from __future__ import annotations

import base64
import io
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

import app
from demo.client import DemoError, LocalBackend, OutOfDistribution, RemoteBackend, connect, load_preprocess, refusal
from demo.presentation import OverlayRenderer, example_images, probability_figure, summary_html
from handler.labels import CLASS_CODES
from handler.preprocessing import decode_image
from handler.settings import load_handler_settings
from ops import torchserve as serve
from ops.torchserve import free_port
from ops.paths import CHECKPOINT as DEFAULT_CHECKPOINT
from ops.paths import MODEL_CONFIG as DEFAULT_MODEL_CONFIG
from tests.conftest import ROOT, post
from tests.tiny_release import synthetic_jpeg

CHROMIUM = Path("/usr/bin/chromium")
# This machine has no internet: no background traffic, no updates, no first-run fetches.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
SCREENSHOT_ARTIFACT = ROOT / "runs" / "artifacts" / "demo_screenshot.png"
NEVUS = "ISIC_0024354.jpg"


@pytest.fixture(scope="module")
def settings():
    return load_handler_settings(DEFAULT_MODEL_CONFIG)


@pytest.fixture(scope="module")
def renderer(settings):
    return OverlayRenderer(load_preprocess(DEFAULT_CHECKPOINT), settings)


@pytest.fixture(scope="module")
def local_backend(settings):
    return LocalBackend(DEFAULT_CHECKPOINT, settings)


def closed_url() -> str:
    return f"http://127.0.0.1:{free_port()}"


def test_defaults_bind_loopback_without_share_link():
    args = app.get_args_parser().parse_args([])
    assert args.host == "127.0.0.1" and not args.share and not args.local and args.auth is None
    assert args.url == "http://127.0.0.1:8080" and Path(args.run_dir) == ROOT / "run"
    assert app.login(args) is None and args.max_upload_mb == 16


@pytest.mark.parametrize("argv", [["--share"], ["--host", "0.0.0.0"], ["--host", "192.168.1.20"], ["--host", "demo.example"],
                                  ["--url", "http://0.0.0.0:8080"], ["--url", "http://10.1.2.3:8080"]])
def test_an_exposed_page_is_refused_without_a_login(argv, tmp_path, capsys, monkeypatch):
    args = app.get_args_parser().parse_args(argv + ["--examples", str(tmp_path)])
    with pytest.raises(DemoError, match="add --auth user:password"):
        app.login(args)
    monkeypatch.setattr(app.signal, "signal", lambda *args: None)  # keep pytest's own SIGTERM handling
    # main refuses before connecting to or starting anything (nothing answers at this URL).
    url = [] if "--url" in argv else ["--url", closed_url()]
    assert app.main(app.get_args_parser().parse_args(argv + url + ["--no-start"])) == 1
    assert "--auth" in capsys.readouterr().err


def test_a_login_allows_exposure_and_loopback_needs_none(tmp_path):
    parse = app.get_args_parser().parse_args
    assert app.login(parse(["--share", "--auth", "ana:s3cret:with:colons", "--allow-third-party-relay"])) == \
        ("ana", "s3cret:with:colons")
    # --share relays patient images through a third party: a login is not enough, it must be accepted explicitly.
    with pytest.raises(DemoError, match="third party"):
        app.login(parse(["--share", "--auth", "ana:pw"]))
    assert app.login(parse(["--url", "http://10.1.2.3:8080", "--auth", "ana:pw"])) == ("ana", "pw")
    assert app.login(parse(["--url", "http://localhost:8080"])) is None
    secret = tmp_path / "auth"
    secret.write_text("ana:from-file\n")
    assert app.login(parse(["--host", "0.0.0.0", "--auth", f"@{secret}"])) == ("ana", "from-file")
    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        assert app.login(parse(["--host", host])) is None
    for bad in ("ana", "ana:", ":pw"):
        with pytest.raises(DemoError, match="user:password"):
            app.login(parse(["--host", "0.0.0.0", "--auth", bad]))


def test_launch_options_carry_the_upload_limit_and_the_login(tmp_path):
    args = app.get_args_parser().parse_args(["--host", "0.0.0.0", "--auth", "ana:pw", "--max-upload-mb", "2",
                                             "--examples", str(tmp_path)])
    uploads = app.Uploads(tmp_path, int(args.max_upload_mb * 2**20))
    options = app.launch_options(args, uploads, [])
    assert options["max_file_size"] == 2 * 2**20 and options["auth"] == ("ana", "pw")
    assert options["server_name"] == "0.0.0.0" and options["share"] is False and options["allowed_paths"] is None


def test_each_run_gets_a_private_upload_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path))
    folder = app.private_upload_folder()
    assert folder.parent == tmp_path and os.environ["GRADIO_TEMP_DIR"] == str(folder)
    assert folder.stat().st_mode & 0o077 == 0  # only this user


class FakeBackend:
    description = "fake"

    def __init__(self, error=None):
        self.error, self.calls = error, []

    def predict(self, image, target_class=None, explanation="fast"):
        self.calls.append((image, target_class))
        raise self.error


def test_an_upload_is_deleted_after_its_request_but_example_copies_and_outside_files_are_kept(tmp_path, renderer):
    root = tmp_path / "gradio"
    example = tmp_path / "data" / "example.jpg"
    example.parent.mkdir()
    example.write_bytes(synthetic_jpeg(1))
    uploads = app.Uploads(root, 2**20, app.digests([example]))
    upload = root / "3f2a" / "lesion.jpg"
    upload.parent.mkdir(parents=True)
    upload.write_bytes(synthetic_jpeg(0))
    copy = root / "9c1d" / "example.jpg"
    copy.parent.mkdir()
    copy.write_bytes(example.read_bytes())
    backend = FakeBackend(DemoError("the server is down"))

    outputs = app.analyse_upload(backend, renderer, uploads, str(upload), "", 0.5)
    assert "the server is down" in outputs[0] and backend.calls == [(synthetic_jpeg(0), None)]
    assert not upload.exists() and not upload.parent.exists() and root.exists()
    assert outputs[5] == {"image": synthetic_jpeg(0)}  # kept in memory for another class, not on disk
    app.analyse_upload(backend, renderer, uploads, str(copy), "", 0.5)
    assert copy.exists()  # a public example image, not a patient's
    assert not uploads.discard(example) and example.exists()  # outside the upload folder


def test_an_oversized_upload_is_refused_unread_and_deleted(tmp_path, renderer):
    uploads = app.Uploads(tmp_path, 1000)
    upload = tmp_path / "big.jpg"
    upload.write_bytes(b"\xff" * 1001)
    backend = FakeBackend()
    outputs = app.analyse_upload(backend, renderer, uploads, str(upload), "", 0.5)
    assert "The image is 0.0 MB; the demo accepts images up to" in outputs[0]
    assert backend.calls == [] and not upload.exists() and outputs[2:5] == (None, None, None)


OUT_OF_DISTRIBUTION_BODY = {"error": {
    "code": "out_of_distribution", "status": 422, "score": 41.73, "threshold": 12.5,
    "message": "this does not look like a dermoscopic image of a skin lesion, so the model cannot judge it"}}


def test_an_out_of_distribution_refusal_is_a_friendly_message_without_probabilities_or_heatmap(renderer):
    error = refusal(422, OUT_OF_DISTRIBUTION_BODY, "")
    assert isinstance(error, OutOfDistribution) and (error.score, error.threshold) == (41.73, 12.5)
    assert not isinstance(refusal(422, {"error": {"code": "other", "message": "x"}}, ""), OutOfDistribution)
    message, summary, chart, original, overlay, state = app.analyse(FakeBackend(error), renderer, synthetic_jpeg(), "", 0.5)
    assert "does not look like a dermoscopic image of a skin lesion" in message and "41.7" in message and "12.5" in message
    assert 'id="out-of-distribution"' in message and "Could not analyse" not in message
    assert summary == "" and chart is None and original is None and overlay is None
    assert "%" not in message and "Suggested class" not in message


def test_the_remote_backend_turns_a_served_422_into_the_refusal(tmp_path):
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    class Refuses(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's name
            self.rfile.read(int(self.headers["Content-Length"]))
            body = json.dumps(OUT_OF_DISTRIBUTION_BODY).encode()
            self.send_response(422)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    http = HTTPServer(("127.0.0.1", 0), Refuses)
    thread = threading.Thread(target=http.serve_forever, daemon=True)
    thread.start()
    try:
        backend = RemoteBackend(f"http://127.0.0.1:{http.server_port}", serve.Server(tmp_path))
        with pytest.raises(OutOfDistribution) as refused:
            backend.predict(synthetic_jpeg())
        assert refused.value.score == 41.73
    finally:
        http.shutdown()


def test_through_gradio_an_upload_leaves_nothing_behind_and_the_size_limit_holds(tmp_path, tiny_checkpoint, settings,
                                                                               monkeypatch):
    """The page served by Gradio itself, called as a browser would (upload, then the change event)."""
    from gradio_client import Client, handle_file

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path))
    folder = app.private_upload_folder()
    uploads = app.Uploads(folder, 200_000)
    renderer = OverlayRenderer(load_preprocess(tiny_checkpoint), settings)
    page = app.build_demo(LocalBackend(tiny_checkpoint, settings), renderer, [], uploads)
    port = free_port()
    page.launch(prevent_thread_lock=True, **app.launch_options(
        app.get_args_parser().parse_args(["--port", str(port), "--examples", str(tmp_path / "none")]), uploads, []))
    try:
        image = tmp_path / "lesion.jpg"
        image.write_bytes(synthetic_jpeg(3, size=(300, 225)))
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        message, summary, *_ = client.predict(handle_file(str(image)), "", 0.5, api_name="/run_upload")
        assert message == "" and "Model version" in summary
        left = [path for path in folder.rglob("*") if path.is_file() and path.read_bytes() == image.read_bytes()]
        assert left == []  # the upload is gone once answered
        big = tmp_path / "big.jpg"
        big.write_bytes(synthetic_jpeg(4, size=(1200, 900)) + b"\0" * 200_000)
        with pytest.raises(Exception, match="(?i)size|413|large"):
            client.predict(handle_file(str(big)), "", 0.5, api_name="/run_upload")
        assert not [path for path in folder.rglob("*") if path.is_file() and path.stat().st_size >= 200_000]
    finally:
        page.close()


def test_an_unknown_risk_is_shown_without_a_colour_of_its_own():
    body = {"prediction": "nv", "label": "Melanocytic nevus", "confidence": 0.6, "risk": "unknown",
            "malignant_probability": 0.05, "referral": {"refer": False, "threshold": 0.1}, "model_version": "2.0.0"}
    assert "UNKNOWN" in summary_html(body, "in-process handler")


def test_server_down_is_a_readable_message(tmp_path):
    url = closed_url()
    with pytest.raises(DemoError, match=r"not answering at .*make serve") as caught:
        RemoteBackend(url, serve.Server(tmp_path)).predict(b"any bytes")
    assert "Traceback" not in str(caught.value)
    with pytest.raises(DemoError, match="no TorchServe answers"):
        connect(url, tmp_path, start_if_down=False)


@pytest.mark.data
def test_local_backend_answers_with_the_server_contract(local_backend, samples_dir, released_version):
    body = local_backend.predict((samples_dir / NEVUS).read_bytes())
    assert list(body["probabilities"]) == list(CLASS_CODES)
    assert body["gradcam"]["class"] == body["prediction"]
    assert body["model_version"] == released_version and "not a diagnosis" in body["notice"]
    melanoma = local_backend.predict((samples_dir / NEVUS).read_bytes(), target_class="mel")
    assert melanoma["gradcam"]["class"] == "mel"
    assert melanoma["probabilities"] == body["probabilities"]


def test_local_backend_refuses_a_bad_image_readably(local_backend):
    with pytest.raises(DemoError, match=r"not an image .*invalid_image, HTTP 415"):
        local_backend.predict(b"this is not a dermoscopic image")


@pytest.mark.data
def test_example_images_are_one_per_class_read_in_place(samples_dir, tmp_path):
    examples = example_images(samples_dir)
    assert [caption.split("labelled ")[1].rstrip(")") for _, caption in examples] == list(CLASS_CODES)
    assert all(path.parent == samples_dir and path.is_file() for path, _ in examples)
    assert example_images(tmp_path / "missing") == []


def test_probability_chart_is_sorted_and_labelled():
    probabilities = {"akiec": 0.05, "bcc": 0.1, "bkl": 0.2, "df": 0.02, "mel": 0.5, "nv": 0.1, "vasc": 0.03}
    axes = probability_figure(probabilities).axes[0]
    names = [label.get_text() for label in axes.get_yticklabels()]
    assert names[0] == "Melanoma (mel)" and names[1] == "Benign keratosis-like lesion (bkl)" and len(names) == 7
    widths = [bar.get_width() for bar in axes.patches]
    assert widths == sorted(widths, reverse=True) and widths[0] == pytest.approx(50.0)
    assert [text.get_text() for text in axes.texts][0] == "50.0%"


def test_summary_shows_diagnosis_colour_coded_risk_threshold_and_version():
    body = {"prediction": "mel", "label": "Melanoma", "confidence": 0.7, "risk": "high", "malignant_probability": 0.8,
            "referral": {"refer": True, "threshold": 0.5}, "model_version": "1.0.0"}
    html = summary_html(body, "TorchServe at http://127.0.0.1:8080")
    assert "Melanoma" in html and "HIGH" in html and "#c62828" in html
    assert "80.0%" in html and "threshold of 50%" in html and "refer to a dermatologist" in html
    assert "1.0.0" in html and "TorchServe at http://127.0.0.1:8080" in html
    not_referred = {**body, "risk": "low", "malignant_probability": 0.1, "referral": {"refer": False, "threshold": 0.5}}
    low = summary_html(not_referred, "in-process handler")
    assert "#2e7d32" in low and "no referral flag" in low
    assert "decision-rule" not in html


def test_summary_says_when_the_suggested_class_is_not_the_most_probable():
    body = {"prediction": "df", "label": "Dermatofibroma", "confidence": 0.06, "most_probable": "nv",
            "decision_rule": "balanced", "probabilities": {"df": 0.06, "nv": 0.81}, "risk": "low",
            "malignant_probability": 0.05, "referral": {"refer": False, "threshold": 0.08}, "model_version": "1.1.0"}
    html = summary_html(body, "in-process handler")
    assert "Dermatofibroma" in html and "6.0%" in html
    assert "decision-rule" in html and "most probable class is Melanocytic nevus (81.0%)" in html
    assert "no-evidence" not in html


def test_summary_says_when_gradcam_finds_no_evidence_for_the_class():
    body = {"prediction": "nv", "label": "Melanocytic nevus", "confidence": 0.95, "most_probable": "nv",
            "probabilities": {"nv": 0.95}, "risk": "low", "malignant_probability": 0.02,
            "referral": {"refer": False, "threshold": 0.1}, "model_version": "1.3.0",
            "gradcam": {"class": "mel", "has_evidence": False}}
    html = summary_html(body, "in-process handler")
    assert "no-evidence" in html and "raises the score of Melanoma" in html
    body["gradcam"]["has_evidence"] = True
    assert "no-evidence" not in summary_html(body, "in-process handler")


@pytest.mark.data
def test_overlay_redrawn_locally_matches_the_handler_and_follows_opacity(local_backend, renderer, samples_dir):
    image = (samples_dir / NEVUS).read_bytes()
    gradcam = local_backend.predict(image)["gradcam"]
    assert renderer.check_matches(gradcam)
    original = decode_image(image).image
    served = np.asarray(Image.open(io.BytesIO(base64.b64decode(gradcam["overlay"]))).convert("RGB"), dtype=float)
    redrawn = renderer.render(original, gradcam["heatmap"], renderer.settings.gradcam_alpha).astype(float)
    # The handler's overlay is a JPEG of the same rendering; the heatmap it carries is rounded to 3 decimals.
    assert redrawn.shape == served.shape and np.abs(redrawn - served).mean() < 3.0
    assert np.array_equal(renderer.render(original, gradcam["heatmap"], 0.0), np.asarray(original))
    stronger = renderer.render(original, gradcam["heatmap"], 0.9).astype(float)
    left, top, right, bottom = gradcam["heatmap_box"]
    assert np.abs(stronger - np.asarray(original, dtype=float))[top:bottom, left:right].mean() > \
        np.abs(redrawn - np.asarray(original, dtype=float))[top:bottom, left:right].mean()


@pytest.mark.slow
@pytest.mark.data
@pytest.mark.timeout(180)
def test_connect_starts_torchserve_when_none_answers(release_store, samples_dir, tmp_path, released_version):
    url = f"http://127.0.0.1:{free_port()}"
    ports = {"management_address": f"http://127.0.0.1:{free_port()}", "metrics_address": f"http://127.0.0.1:{free_port()}",
             "grpc_inference_port": str(free_port()), "grpc_management_port": str(free_port())}
    backend, started = connect(url, tmp_path / "run", model_store=release_store, overrides=ports)
    try:
        assert started is not None and started.is_running()
        assert backend.predict((samples_dir / NEVUS).read_bytes())["model_version"] == released_version
        attached, started_again = connect(url, tmp_path / "run", model_store=release_store)
        assert started_again is None and attached.url == url
    finally:
        if started is not None:
            serve.stop(started)


@pytest.fixture(scope="module")
def demo_url(torchserve, samples_dir, tmp_path_factory):
    """``python app.py`` as a person runs it, a client of the real TorchServe; stopped by its own process group."""
    folder = tmp_path_factory.mktemp("demo")
    port = free_port()
    command = [sys.executable, str(ROOT / "app.py"), "--url", torchserve.url("inference"), "--run-dir",
               str(torchserve.run_dir), "--no-start", "--port", str(port), "--examples", str(samples_dir)]
    env = {**os.environ, "GRADIO_TEMP_DIR": str(folder / "gradio")}
    log_path = folder / "demo.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the demo did not come up at {url}:\n{log_path.read_text(errors='replace')[-3000:]}")
            try:
                if requests.get(url, timeout=2).ok:
                    break
            except requests.ConnectionError:
                time.sleep(0.5)
        yield url
    finally:
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass  # a demo that failed to start has already exited, with its whole group: nothing to stop
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


@pytest.fixture(scope="module")
def browser():
    """Debian's Chromium, headless, driven by Playwright (which downloads no browser of its own)."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} not found: install Debian's chromium (`apt-get install chromium`, as .ci/run does)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser, demo_url):
    context = browser.new_context(viewport={"width": 1400, "height": 1100})
    page = context.new_page()
    page.set_default_timeout(60_000)
    page.goto(demo_url)
    page.wait_for_selector("#notice")
    yield page
    context.close()


@pytest.mark.slow
@pytest.mark.data
@pytest.mark.timeout(180)
def test_browser_upload_shows_chart_overlay_and_notice(page, torchserve, samples_dir, tmp_path):
    image = samples_dir / NEVUS
    expected = post(torchserve, image.read_bytes(), content_type=None).json()
    notice = page.locator("#notice")
    assert notice.is_visible() and "not a diagnosis" in notice.inner_text()

    page.set_input_files("#upload input[type=file]", str(image))
    page.wait_for_selector("#overlay img")
    page.wait_for_selector("#probabilities img")
    assert page.inner_text("#top-diagnosis") == expected["label"]
    assert page.inner_text("#risk") == expected["risk"].upper()
    assert f"Model version {expected['model_version']}" in page.inner_text("#model-version")
    assert f"{100 * expected['malignant_probability']:.1f}%" in page.inner_text("#malignant")
    chart = page.locator("#probabilities img")
    assert chart.is_visible() and chart.bounding_box()["height"] > 150
    overlay = page.locator("#overlay img")
    assert overlay.is_visible() and overlay.evaluate("img => img.naturalWidth") == 600
    assert page.locator("#original img").is_visible()
    assert f"Grad-CAM of {expected['label']}" in page.inner_text("#overlay")
    assert notice.is_visible()
    screenshot = tmp_path / "demo_screenshot.png"
    page.screenshot(path=str(screenshot), full_page=True)
    SCREENSHOT_ARTIFACT.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(screenshot, SCREENSHOT_ARTIFACT)

    # Explain another class: a new request, and the overlay's caption follows.
    before = overlay.get_attribute("src")
    page.click("#target-class input")
    page.get_by_role("option", name="Melanoma (mel)").click()
    page.wait_for_function("() => document.querySelector('#overlay').innerText.includes('Grad-CAM of Melanoma (mel)')")
    page.wait_for_function(f"() => document.querySelector('#overlay img').src !== {before!r}")
    # Opacity: redrawn from the heatmap already received.
    before = page.locator("#overlay img").get_attribute("src")
    opacity = page.locator("#opacity input[type=number]")
    opacity.fill("0.9")
    opacity.press("Enter")
    page.wait_for_function(f"() => document.querySelector('#overlay img').src !== {before!r}")
    assert not page.locator("#error").count()


@pytest.mark.slow
@pytest.mark.data
@pytest.mark.timeout(180)
def test_browser_shows_a_bad_image_as_a_readable_message(page, tmp_path):
    bad = tmp_path / "lesion.jpg"
    bad.write_bytes(b"this file only pretends to be a JPEG")
    page.set_input_files("#upload input[type=file]", str(bad))
    message = page.locator("#error")
    message.wait_for()
    text = message.inner_text()
    assert "Could not analyse the image" in text and "invalid_image, HTTP 415" in text
    assert "Traceback" not in page.content()
    assert not page.locator("#overlay img").count()
    assert page.locator("#notice").is_visible()
