"""``ovss-fast serve``: the page's requests against ``ovss-fast segment`` (tiny random-weight model, no
downloads), its bad-input messages, two requests at once, and the page itself in headless Chromium."""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import pytest
import torch

pytest.importorskip("open_clip", reason="the page segments with open_clip")

from PIL import Image  # noqa: E402

from ovss_fast.apps import web  # noqa: E402
from ovss_fast.apps.cli import main  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:pretrained=None")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START = ["--model", "ovss-fast-tiny", "--backend", "reference", "--seed", "3"]
CLASSES = "cat; kitten, dog, grass"


def start_args(*extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    web.add_arguments(parser)
    return parser.parse_args([*START, *extra])


@pytest.fixture(scope="module")
def app():
    return web.App(start_args())


def write_image(path, h=70, w=100, seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return str(path)


def cli_labels(tmp_path, image, classes, *flags, seed=3) -> np.ndarray:
    """``ovss-fast segment`` on the same image, options and seed (the random weights drawn after manual_seed)."""
    out = tmp_path / "cli_labels.png"
    torch.manual_seed(seed)
    rc = main(["segment", image, "--classes", classes, "--model", "ovss-fast-tiny", "--pretrained", "none",
               "--backend", "reference", "--out", str(out), *flags])
    assert rc == 0
    return np.asarray(Image.open(out))


@pytest.mark.parametrize("values, flags", [
    ({}, []),
    ({"mode": "op", "window": "48", "stride": "32"}, ["--mode", "op", "--window", "48", "--stride", "32"]),
    ({"mode": "kl", "window": "32"}, ["--mode", "kl", "--window", "32"]),
])
def test_page_labels_equal_the_segment_command(app, tmp_path, values, flags):
    image = write_image(tmp_path / "photo.png")
    r = app.run(image, CLASSES, values)
    assert r.labels is not None, r.message
    page = np.asarray(Image.open(r.labels))
    assert Image.open(r.labels).mode == "P"
    np.testing.assert_array_equal(page, cli_labels(tmp_path, image, CLASSES, *flags))
    np.testing.assert_array_equal(page, r.label_map)
    assert "random weights" in r.message  # no weights given: the page warns
    # the legend: each class found, with its share of the image
    counts = np.bincount(page.ravel(), minlength=3)
    for c, name in enumerate(["cat; kitten", "dog", "grass"]):
        if counts[c]:
            assert f"<td>{name}</td><td>{100 * counts[c] / page.size:.1f}%</td>" in r.legend
    # the stages are timed; the scores download is [C, gh, gw] and its argmax is a class map
    for stage in ("read the image", "visual", "class_distributions", "jbu", "total"):
        assert f"| {stage} |" in r.timings
    scores = np.load(r.scores)
    assert scores.dtype == np.float32 and scores.shape[0] == 3 and np.isfinite(scores).all()
    ov = Image.open(r.overlay)
    assert ov.height >= 70 and ov.width > 100  # the legend panel sits on the right, as the command's --overlay


def test_bad_input_is_a_message_and_the_next_request_works(app, tmp_path):
    good = write_image(tmp_path / "good.png")
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    Image.new("RGB", (3000, 3000), (90, 140, 200)).save(tmp_path / "huge.png")
    cases = [
        (str(text), CLASSES, {}, "could not read image file &#x27;notes.txt&#x27;"),
        (good, "", {}, "class_names is empty"),
        (good, " , ", {}, "names no class"),
        (None, CLASSES, {}, "no image"),
        (str(tmp_path / "huge.png"), CLASSES, {}, "needs about"),  # the Segmenter's memory guard
        (good, CLASSES, {"model": "ViT-Q-99"}, "unknown open_clip model &#x27;ViT-Q-99&#x27;"),
        (good, CLASSES, {"model": "local-dir:/tmp"}, "the page takes open_clip model names"),
        (good, CLASSES, {"pretrained": "/etc/passwd"}, "weights must be one of"),
        (good, CLASSES, {"mode": "fast"}, "mode must be one of"),
        (good, CLASSES, {"window": "big"}, "window must be &#x27;whole image&#x27; or a number of pixels"),
        (good, CLASSES, {"window": "50"}, "multiple"),
        (good, "cat, Cat", {}, "duplicate"),
    ]
    for upload, classes, values, expected in cases:
        r = app.run(upload, classes, values)
        assert r.message.startswith("**Error:**") and expected in r.message, (upload, values, r.message)
        assert r.labels is None and r.overlay is None and "Traceback" not in r.message
        assert str(tmp_path) not in r.message  # the upload's name, not the server's path
    r = app.run(good, CLASSES, {})
    assert r.labels is not None and r.message.startswith(web.RANDOM_WARNING)


def test_with_weights_the_page_is_the_command(tmp_path):
    """Weights from a local checkpoint file (the tiny model's, saved): the same labels, no seed involved, no
    random-weights warning."""
    import open_clip

    from ovss_fast.models.clip_features import TINY_MODEL, register_tiny_config

    register_tiny_config()
    torch.manual_seed(11)
    weights = tmp_path / "tiny.pt"
    torch.save(open_clip.create_model(TINY_MODEL, pretrained=None).state_dict(), weights)
    image = write_image(tmp_path / "photo.png", 90, 60, seed=2)
    page = web.App(start_args("--pretrained", str(weights), "--seed", "0"))
    r = page.run(image, CLASSES, {"mode": "op"})
    assert r.labels is not None, r.message
    assert "random weights" not in r.message
    expected = cli_labels(tmp_path, image, CLASSES, "--mode", "op", "--pretrained", str(weights), seed=5)
    np.testing.assert_array_equal(np.asarray(Image.open(r.labels)), expected)
    assert len(np.unique(expected)) > 1


def test_huge_image_refused_from_its_header(tmp_path):
    small = web.App(start_args("--max-pixels", "5000"))
    r = small.run(write_image(tmp_path / "a.png"), CLASSES, {})
    assert "100x70 = 0.0 megapixels, over this page&#x27;s limit" in r.message


def test_two_requests_at_once_run_one_after_the_other(app, tmp_path, monkeypatch):
    image = write_image(tmp_path / "a.png", seed=5)
    first = app.run(image, CLASSES, {})
    running, most = [0], [0]
    inner = web.App._run

    def counted(self, *a, **k):
        running[0] += 1
        most[0] = max(most[0], running[0])
        time.sleep(0.2)
        try:
            return inner(self, *a, **k)
        finally:
            running[0] -= 1

    monkeypatch.setattr(web.App, "_run", counted)
    results = [None, None]
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, app.run(image, CLASSES, {})))
               for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert most[0] == 1  # the lock: never two at once
    for r in results:
        assert r is not None and r.labels is not None, r and r.message
        np.testing.assert_array_equal(r.label_map, first.label_map)
    # a request that cannot get the model in time says busy, and the next one works
    with app.lock:
        busy = app.run(image, CLASSES, {}, wait_s=0.1)
    assert busy.message.startswith("**Busy:**") and busy.labels is None
    assert app.run(image, CLASSES, {}).labels is not None


def test_one_list_of_controls_and_the_transition_entry():
    names = [c.name for c in web.CONTROLS]
    assert names[:3] == ["model", "pretrained", "mode"] and {"affinity", "window", "stride"} <= set(names)
    assert ("transition" in names) == web.segmenter_accepts("transition")
    assert web.segmenter_accepts("mode") and not web.segmenter_accepts("no_such_option")
    args = start_args("--pretrained", "/weights/model.bin", "--mode", "op")
    by_name = {c.name: web.control_choices(c, args) for c in web.CONTROLS}
    assert by_name["pretrained"] == (["/weights/model.bin", "none"], "/weights/model.bin")
    assert by_name["mode"][1] == "op" and by_name["model"][1] == "ovss-fast-tiny"
    ns, kw = web.request_options(args, {"window": "448", "stride": "half the window"})
    assert (ns.model, ns.pretrained, ns.mode, kw["window"], kw["stride"]) == ("ovss-fast-tiny", "/weights/model.bin",
                                                                              "op", 448, None)


def test_serve_without_gradio_says_what_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)
    assert main(["serve", *START]) == 2
    assert 'pip install -e ".[web]"' in capsys.readouterr().err


def test_serve_flags_are_checked(capsys):
    assert main(["serve", *START, "--alpha", "2"]) == 2
    assert "--alpha must lie in [0, 1]" in capsys.readouterr().err


def test_the_page_builds(app):
    pytest.importorskip("gradio", reason="the page needs Gradio: pip install -e '.[web]'")
    page = web.build_page(app)
    assert page.title == "ovss-fast"


# --------------------------------------------------------------------------- the page in headless Chromium
def _browser() -> tuple[str, str]:
    """Chromium and its driver (Debian: apt-get install chromium chromium-driver), or skip saying so."""
    pytest.importorskip("gradio", reason="the page needs Gradio: pip install -e '.[web]'")
    pytest.importorskip("selenium", reason="the browser test needs selenium: pip install -e '.[test]'")
    binary = next((shutil.which(n) for n in ("chromium", "chromium-browser") if shutil.which(n)), None)
    driver = shutil.which("chromedriver")
    if binary is None or driver is None:
        pytest.skip("no Chromium here (needs chromium and chromedriver on PATH: apt-get install chromium "
                    "chromium-driver; .ci/run installs them)")
    return binary, driver


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_page(tmp_path):
    """``ovss-fast serve`` in a child process on 127.0.0.1 (tiny random-weight model); always stopped."""
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
               GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1", NO_PROXY="127.0.0.1,localhost",
               no_proxy="127.0.0.1,localhost", GRADIO_TEMP_DIR=str(tmp_path / "gradio"))
    log = open(tmp_path / "server.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "ovss_fast", "serve", *START, "--host", "127.0.0.1",
                             "--port", str(port)], cwd=str(tmp_path), env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        deadline = time.monotonic() + 240
        while True:
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"ovss-fast serve exited with {proc.returncode}:\n{log.read()[-3000:]}")
            try:
                if opener.open(url, timeout=5).status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                log.seek(0)
                pytest.fail(f"ovss-fast serve did not answer on {url} within 240 s:\n{log.read()[-3000:]}")
            time.sleep(1)
        yield url, opener
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(20)
        log.close()


def _wait(what, until, timeout=240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = until()
        if value:
            return value
        time.sleep(0.5)
    pytest.fail(f"the page did not show {what} within {timeout} s")


@pytest.mark.slow
def test_the_page_in_headless_chromium(tmp_path):
    binary, driver_path = _browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # selenium's manager never looks online
    image, classes = web.synthetic_example(str(tmp_path))
    expected = cli_labels(tmp_path, image, classes)
    assert len(np.unique(expected)) > 1  # a map worth comparing
    text = tmp_path / "notes.txt"
    text.write_text("not an image")

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1500",
              "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1", "--no-proxy-server"):
        options.add_argument(a)  # loopback only
    with serve_page(tmp_path) as (url, opener):
        browser = webdriver.Chrome(service=Service(driver_path), options=options)
        try:
            browser.get(url)
            page = Page(browser)
            assert "random weights" in page.text("start-warning")
            message = page.run(image, classes)
            assert "Segmented synthetic_scene.png (320x240) into 6 classes" in message and "random weights" in message
            link = _wait("the label PNG", lambda: page.find("#labels-file a[href]"))
            (tmp_path / "page_labels.png").write_bytes(opener.open(link[0].get_attribute("href"), timeout=30).read())
            np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "page_labels.png")), expected)
            assert _wait("the overlay", lambda: page.find("#overlay img"))
            assert "share of the image" in page.text("legend") and "%" in page.text("legend")
            assert "jbu" in page.text("timings")
            browser.save_screenshot(str(tmp_path / "web.png"))
            if os.environ.get("OVSS_FAST_WEB_SCREENSHOT"):  # the README's screenshot: docs/web.png
                shutil.copy(tmp_path / "web.png", os.environ["OVSS_FAST_WEB_SCREENSHOT"])

            message = page.run(str(text), classes)
            assert "could not read image file 'notes.txt'" in message and "Traceback" not in browser.page_source
            # the next request works: the bundled example, with other classes
            page.find("#upload button[aria-label='Clear']")[0].click()
            page.browser.find_element(page.by.XPATH, "//td[contains(., 'synthetic_scene')]").click()
            _wait("the example's classes", lambda: page.find("#classes textarea, #classes input")[0]
                  .get_attribute("value") == classes)
            _wait("the example's image", lambda: "synthetic_scene" in page.text("upload"))
            assert "Segmented synthetic_scene.png (320x240) into 2 classes" in page.run(None, "sky, grass")
        finally:
            browser.quit()


class Page:
    """The page's elements by id, and one request: upload (after clearing the last file), classes, run."""

    def __init__(self, browser) -> None:
        from selenium.webdriver.common.by import By

        self.browser, self.by = browser, By

    def find(self, css: str) -> list:
        return self.browser.find_elements(self.by.CSS_SELECTOR, css)

    def text(self, elem_id: str) -> str:
        return _wait(f"#{elem_id}", lambda: self.find(f"#{elem_id}"), 60)[0].text

    def run(self, path: str | None, names: str) -> str:
        """Upload ``path`` (None: keep the image there), type ``names``, run; the message."""
        if path is not None:
            for clear in self.find("#upload button[aria-label='Clear']"):
                clear.click()
            upload = _wait("the upload box", lambda: self.find("#upload input[type=file]"), 60)
            upload[0].send_keys(path)
            stem = os.path.splitext(os.path.basename(path))[0]  # the page shows the name and the suffix apart
            _wait("the uploaded file", lambda: stem in self.text("upload"))
        box = self.find("#classes textarea, #classes input")[0]
        box.clear()
        box.send_keys(names)
        before = self.message()
        self.find("#run")[0].click()
        return _wait("a result", lambda: self.message() if self.message() not in ("", before) else None)

    def message(self) -> str:
        """The message's text, without the progress line Gradio shows on it while a request runs."""
        text = self.text("message")
        busy = any(line.startswith(("processing", "queue")) for line in text.splitlines())
        return "" if busy else text
