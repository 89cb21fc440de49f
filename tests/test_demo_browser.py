"""The demo in a real browser: headless Chromium (Debian's ``chromium``) driven by Playwright.

Runs the bundled stroke example with the GAN, checks the synthesized images appear, downloads a
synthesized NIfTI and loads it with nibabel, uploads bad files and reads the messages, and checks
that a visitor's folder goes when they leave. Skips only where Chromium (or Playwright/gradio) is
absent; ``.ci/run`` installs Chromium. ``MMDIFF_DEMO_SCREENSHOTS=DIR`` keeps the screenshots.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

CHROMIUM = os.environ.get("MMDIFF_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
if not Path(CHROMIUM).exists():
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium; .ci/run does)", allow_module_level=True)
pytest.importorskip("gradio", reason="the demo needs gradio: pip install -e '.[test]'")
playwright = pytest.importorskip("playwright.sync_api", reason="the browser test needs playwright: pip install -e '.[test]'")

from mmdiff import demo as d  # noqa: E402
from mmdiff.io import is_synthetic  # noqa: E402
from test_demo import serve  # noqa: E402

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    engines = d.load_engines(engines=["gan"])
    examples = d.build_examples(tmp_path_factory.mktemp("examples"), cohorts=["stroke"], slab_mm=24)
    sessions = d.Sessions(tmp_path_factory.mktemp("sessions"))
    demo = d.build_demo(engines, examples=examples, sessions=sessions)
    url = serve(demo)
    yield url, sessions, examples
    demo.close()


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, app, tmp_path):
    context = browser.new_context(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(120_000)
    page.goto(app[0])
    page.wait_for_selector("#run")
    yield page
    shots = os.environ.get("MMDIFF_DEMO_SCREENSHOTS")
    if shots:
        Path(shots).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(shots) / f"{os.environ['PYTEST_CURRENT_TEST'].split(':')[-1].split(' ')[0]}.png"),
                        full_page=True)
    context.close()


def test_an_example_runs_shows_images_and_downloads_a_nifti(page, app, tmp_path):
    url, sessions, examples = app
    page.get_by_text("stroke phantom: DWI + ADC -> FLAIR").click()
    page.wait_for_function("document.querySelector('#upload-dwi').innerText.includes('KB')")
    page.click("#run")
    page.wait_for_selector("#synthetic-gallery img")
    status = page.inner_text("#status")
    assert "Done." in status and "FLAIR synthesized from DWI, ADC" in status and "not for diagnosis" in status
    assert page.locator("#inputs-gallery img").count() == 2
    assert page.locator("#synthetic-gallery img").count() == 1
    assert "FLAIR (synthetic)" in page.inner_text("#synthetic-gallery")

    # another plane: new pictures, the slider follows
    before = page.locator("#synthetic-gallery img").first.get_attribute("src")
    page.locator("#plane").get_by_text("coronal").click()
    page.wait_for_function(f"document.querySelector('#synthetic-gallery img').src != {before!r}")

    # a download is a NIfTI that nibabel reads, marked synthetic, on the example's grid
    link = page.locator("#downloads a[download='flair_synthetic.nii.gz']")
    with page.expect_download() as info:
        link.click()
    saved = tmp_path / "downloaded.nii.gz"
    info.value.save_as(saved)
    image = nib.load(str(saved))
    dwi = nib.load(str(examples[0].files["dwi"]))
    assert is_synthetic(saved) and image.shape == dwi.shape and np.allclose(image.affine, dwi.affine)
    assert np.asarray(image.dataobj).max() > 0
    with page.expect_download() as info:
        page.locator("#downloads a[download='flair_synthetic.json']").click()
    info.value.save_as(tmp_path / "sidecar.json")
    assert '"synthetic": true' in (tmp_path / "sidecar.json").read_text()


def test_bad_uploads_get_a_message_not_a_stack_trace(page, tmp_path):
    series = tmp_path / "series.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((8, 8, 8, 3)).astype(np.float32), np.eye(4)), str(series))
    page.locator("#upload-t1 input[type=file]").set_input_files(str(series))
    page.wait_for_function("document.querySelector('#upload-t1').innerText.includes('KB')")
    page.click("#run")
    page.wait_for_function("document.querySelector('#status').innerText.includes('Cannot synthesize')")
    status = page.inner_text("#status")
    assert "T1 (series.nii.gz) is 4D with shape (8, 8, 8, 3)" in status
    assert "Traceback" not in page.content() and str(tmp_path) not in status
    assert page.locator("#synthetic-gallery img").count() == 0

    # a file that is not NIfTI at all: refused with a message in the page, whoever says it
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    page.reload()
    page.wait_for_selector("#run")
    page.locator("#upload-t1 input[type=file]").set_input_files(str(text))
    page.click("#run")
    page.wait_for_function("/not a NIfTI file|Invalid file type/.test(document.body.innerText)")
    assert "Traceback" not in page.content()


def test_a_visitors_folder_goes_when_they_leave(browser, app):
    url, sessions, _ = app
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(120_000)
    page.goto(url)
    page.get_by_text("stroke phantom: DWI + ADC -> FLAIR").click()
    page.wait_for_function("document.querySelector('#upload-dwi').innerText.includes('KB')")
    known = set(sessions.root.iterdir())
    page.click("#run")
    page.wait_for_selector("#synthetic-gallery img")
    (folder,) = set(sessions.root.iterdir()) - known
    assert any(folder.rglob("*_synthetic.nii.gz"))
    context.close()
    deadline = time.monotonic() + 60
    while folder.exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not folder.exists()
