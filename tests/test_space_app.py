"""The Spaces demo in headless Chromium (Debian's `chromium` + `chromium-driver`, driven by Selenium):
ask about an uploaded image, generate an image, tokenize, and a non-image upload; a screenshot is kept
in outputs/test-artifacts/. The app runs as a Space would: a copy of hub_upload/space/ outside the
repository, loading an export through remote code."""

import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import PIL.Image
import pytest
import torch
from hub_fixtures import REPO_ROOT, clean_env, write_tiny_run
from utils_network import free_port

from hub_upload.export import export_run

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
ARTIFACTS = REPO_ROOT / "outputs" / "test-artifacts"
CHROMIUM_FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1280,1400",
]

selenium = pytest.importorskip("selenium", reason="the Space test needs selenium (pip install -e .[dev])")
gradio = pytest.importorskip("gradio", reason="the Space test needs gradio (pip install -e .[dev])")
if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
    pytest.skip(
        "needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver; .ci/run does)",
        allow_module_level=True,
    )

from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as EC  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def space(tmp_path_factory):
    """The app serving a tiny exported model on 127.0.0.1; yields its URL."""
    root = tmp_path_factory.mktemp("space")
    run, _, _ = write_tiny_run(root / "run")
    export = export_run(run, root / "export")
    app_dir = root / "app"
    shutil.copytree(REPO_ROOT / "hub_upload" / "space", app_dir)
    port = free_port()
    env = clean_env(
        root,
        HF_HUB_OFFLINE="1",
        GRADIO_ANALYTICS_ENABLED="False",
        UNICODE_MODEL=str(export),
        GRADIO_TEMP_DIR=str(root / "gradio"),
    )
    log = open(root / "app.log", "w")
    # `python -I` from a folder outside the repository: the app must not need this project's packages.
    process = subprocess.Popen(
        [
            sys.executable,
            "-I",
            "app.py",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--min-new-tokens",
            "3",
            "--max-new-tokens",
            "6",
        ],
        cwd=app_dir,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 180
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if process.poll() is not None or time.time() > deadline:
                process.kill()
                pytest.fail(f"the Space app did not start:\n{(root / 'app.log').read_text()[-3000:]}")
            time.sleep(0.5)
    yield url, root
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
    log.close()


@pytest.fixture()
def browser(tmp_path):
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={tmp_path / 'chromium-profile'}"]:
        options.add_argument(flag)
    os.environ.setdefault("SE_AVOID_STATS", "true")
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=str(CHROMEDRIVER)))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def open_tab(driver, name: str) -> None:
    tab = WebDriverWait(driver, 30).until(
        EC.element_to_be_clickable((By.XPATH, f"//button[@role='tab' and normalize-space(.)='{name}']"))
    )
    tab.click()


def upload(driver, elem_id: str, path: Path) -> None:
    field = WebDriverWait(driver, 30).until(
        EC.presence_of_element_located((By.CSS_SELECTOR, f"#{elem_id} input[type=file]"))
    )
    field.send_keys(str(path))
    # Wait for the upload to land: the component lists the file by name.
    WebDriverWait(driver, 30).until(
        EC.presence_of_element_located((By.CSS_SELECTOR, f"#{elem_id} td.filename[aria-label='{path.name}']"))
    )


def click(driver, elem_id: str) -> None:
    WebDriverWait(driver, 30).until(EC.element_to_be_clickable((By.ID, elem_id))).click()


def click_css(driver, selector: str) -> None:
    WebDriverWait(driver, 30).until(EC.element_to_be_clickable((By.CSS_SELECTOR, selector))).click()


def textbox_value(driver, elem_id: str) -> str:
    return driver.find_element(By.CSS_SELECTOR, f"#{elem_id} textarea").get_property("value") or ""


def test_space_in_headless_chromium(space, browser, tmp_path):
    url, root = space
    image = PIL.Image.fromarray(
        (torch.rand(40, 48, 3, generator=torch.Generator().manual_seed(1)) * 255).byte().numpy()
    )
    image_path = tmp_path / "shapes.png"
    image.save(image_path)
    browser.get(url)

    # Ask about an image: upload + question -> a non-empty answer.
    open_tab(browser, "Ask about an image")
    upload(browser, "ask-image", image_path)
    question = browser.find_element(By.CSS_SELECTOR, "#ask-question textarea")
    question.clear()
    question.send_keys("what color is the shape?")
    click(browser, "ask-button")
    WebDriverWait(browser, 120).until(lambda d: textbox_value(d, "ask-answer").strip())
    answer = textbox_value(browser, "ask-answer")
    assert answer.strip() and "empty answer" not in answer
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "space-ask.png"))

    # Generate an image: prompt, guidance, seed -> an image.
    open_tab(browser, "Generate an image")
    click(browser, "gen-button")
    generated = WebDriverWait(browser, 120).until(EC.presence_of_element_located((By.CSS_SELECTOR, "#gen-output img")))
    WebDriverWait(browser, 30).until(lambda d: generated.get_attribute("naturalWidth") not in (None, "0"))
    assert int(generated.get_attribute("naturalWidth")) >= 16
    browser.save_screenshot(str(ARTIFACTS / "space-generate.png"))

    # Tokenize: an image -> its reconstruction and code ids (16 positions x depth 2 for the tiny rq model).
    open_tab(browser, "Tokenize")
    upload(browser, "tok-image", image_path)
    click(browser, "tok-button")
    WebDriverWait(browser, 120).until(lambda d: textbox_value(d, "tok-codes").strip())
    codes = textbox_value(browser, "tok-codes")
    assert "32 vocabulary ids" in codes and len(codes.splitlines()) == 5
    WebDriverWait(browser, 30).until(EC.presence_of_element_located((By.CSS_SELECTOR, "#tok-recon img")))

    shot = tmp_path / "space.png"
    assert browser.save_screenshot(str(shot))
    shutil.copyfile(shot, ARTIFACTS / "space.png")

    # A file that is not an image: a clear message in the page, no answer.
    not_image = tmp_path / "notes.png"
    not_image.write_text("these are notes, not pixels")
    open_tab(browser, "Ask about an image")
    click_css(browser, "#ask-image button[aria-label='Clear']")  # a filled File component shows no upload field
    upload(browser, "ask-image", not_image)
    click(browser, "ask-button")

    def bad_upload_message(driver):
        # Read the text inside the wait: Gradio's error toast dismisses itself, and on a loaded machine
        # it can be gone (or half-rendered) by the time a later assertion looks at the page.
        for element in driver.find_elements(
            By.XPATH, "//*[contains(normalize-space(.), 'is not an image this demo can read')]"
        ):
            try:
                text = element.text
            except StaleElementReferenceException:
                continue
            if "Upload a PNG, JPEG or WebP picture" in text:
                return text
        return False

    message = WebDriverWait(browser, 60).until(bad_upload_message)
    assert "notes.png" in message.replace("\n", "")
    assert str(tmp_path) not in browser.page_source  # no server paths shown to the visitor
    browser.save_screenshot(str(ARTIFACTS / "space-bad-upload.png"))
