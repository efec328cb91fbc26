"""The web editor in a real browser (issue 20): headless Chromium (the system's `chromium` and `chromium-driver`,
which `.ci/run` installs) loads the page, starts a session, paints a stroke, and the result changes only near it."""

import base64
import io
import os
import shutil
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from sparsedit import pretrained

from .test_serve import live_server, registry  # noqa: F401  (fixtures)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
if not (CHROMIUM and DRIVER):
    if os.environ.get("SPARSEDIT_REQUIRE_BROWSER"):
        raise RuntimeError("the browser test needs the Debian packages chromium and chromium-driver (see .ci/run).")
    pytest.skip(
        "no system Chromium and chromedriver (apt-get install chromium chromium-driver)", allow_module_level=True
    )
webdriver = pytest.importorskip("selenium.webdriver")


def result_pixels(driver) -> np.ndarray:
    src = driver.find_element("css selector", "[data-testid=result]").get_attribute("src")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))).astype(int)


def wait_for(driver, condition, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = driver.execute_script(condition)
        if value:
            return value
        time.sleep(0.1)
    error = driver.find_element("css selector", "[data-testid=error]").text
    raise AssertionError(f"timed out waiting for {condition!r} (page error: {error!r})")


@pytest.fixture
def browser():
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1200,900",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def test_paint_a_stroke_and_only_its_neighbourhood_changes(live_server, browser, tmp_path):  # noqa: F811
    from selenium.webdriver.common.action_chains import ActionChains

    browser.get(live_server + "/")
    wait_for(browser, "return document.body.dataset.ready === '1'")
    browser.find_element("css selector", "[data-testid=start]").click()
    wait_for(browser, "return document.querySelector('[data-testid=stats]').dataset.edits === '0'")
    before = result_pixels(browser)
    # The page opens on the first model: scene-dit (256 px) once its weights are installed, else scene-ddpm (64 px).
    model = browser.execute_script("return document.querySelector('[data-testid=model]').value")
    canvas = browser.find_element("css selector", "[data-testid=canvas]")
    size = browser.execute_script("return document.querySelector('[data-testid=canvas]').width")
    if "scene-dit" in pretrained.available():
        assert (model, size) == ("scene-dit", 256)
    k = size / 64  # the stroke and its reach below are given in 64 px units
    scale = canvas.size["width"] / size  # the canvas is shown larger
    # A short horizontal stroke at image pixels (y=48, x=12..28 at 64 px), in canvas offsets from its centre.
    start = (int((12 * k - size / 2) * scale), int((48 * k - size / 2) * scale))
    ActionChains(browser).move_to_element_with_offset(canvas, *start).click_and_hold().move_by_offset(
        int(16 * k * scale), 0
    ).release().perform()
    wait_for(browser, "return document.querySelector('[data-testid=stats]').dataset.edits === '1'")
    after = result_pixels(browser)
    changed = np.abs(after - before).max(axis=-1) > 0
    assert changed.any(), "the stroke did not change the result"
    ys, xs = np.nonzero(changed)
    # Everything that changed lies near the stroke (its reach: the SDEdit region, dilated; for scene-dit one latent
    # pixel and one 16 px token around the stroke's tokens).
    near = 16 * k
    assert ys.min() >= 48 * k - near and ys.max() <= 48 * k + near, (model, ys)
    assert xs.min() >= 12 * k - near and xs.max() <= 28 * k + near, (model, xs)
    assert changed.mean() < 0.25
    shot = Path(os.environ.get("SPARSEDIT_SCREENSHOT_DIR", tmp_path)) / "web-editor.png"
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 1000
    text = browser.find_element("css selector", "[data-testid=stats]").text
    assert "less work" in text and "the capture's speed" in text and "replica" in text


def test_a_prompt_edit_on_the_shipped_text_model(live_server, browser):  # noqa: F811
    """scene-sd in the editor: loading a scene fills the prompt with its caption; changing a word and applying it
    regenerates part of the image."""
    browser.get(live_server + "/")
    wait_for(browser, "return document.body.dataset.ready === '1'")
    browser.execute_script(  # the model's change handler loads the scene of the seed set first
        "document.querySelector('[data-testid=seed]').value = '1000004';"
        "const m = document.querySelector('[data-testid=model]'); m.value = 'scene-sd-img2img';"
        "m.dispatchEvent(new Event('change'));"
    )
    caption = wait_for(browser, "const v = document.querySelector('[data-testid=prompt]').value;"
                                "return v.includes('cloudy') && v")  # fmt: skip
    browser.find_element("css selector", "[data-testid=start]").click()
    wait_for(browser, "return document.querySelector('[data-testid=stats]').dataset.edits === '0'")
    before = result_pixels(browser)
    prompt = browser.find_element("css selector", "[data-testid=prompt]")
    prompt.clear()
    prompt.send_keys(caption.replace("a cloudy sky", "a clear sky"))
    browser.find_element("css selector", "[data-testid=send-prompt]").click()
    wait_for(browser, "return document.querySelector('[data-testid=stats]').dataset.edits === '1'")
    changed = np.abs(result_pixels(browser) - before).max(axis=-1) > 0
    assert 0 < changed.mean() < 0.9, changed.mean()
    # The page polled the steps of its capture and edit (GET /progress/{token}) and showed them while they ran.
    seen = browser.execute_script("return window.progressSeen")
    assert seen and all(0 < p["step"] <= p["steps"] for p in seen), seen
    assert {p["phase"] for p in seen} <= {"capture", "edit"}
    assert browser.find_element("css selector", "[data-testid=progress]").text == ""  # cleared when done


def test_the_page_cleans_up_and_ignores_what_it_superseded(live_server, browser):  # noqa: F811
    """Issue 37's page rows: Start and a model switch delete the previous session; a non-JSON answer is shown as an
    error; a non-square picture keeps its aspect ratio; the brush is off on a text-only model; a late Undo reply
    after a model switch does not paint over the new model's canvas."""
    browser.get(live_server + "/")
    wait_for(browser, "return document.body.dataset.ready === '1'")
    browser.find_element("css selector", "[data-testid=start]").click()
    wait_for(browser, "return document.querySelector('[data-testid=stats]').dataset.edits === '0'")
    first = browser.execute_script("return session;")
    browser.find_element("css selector", "[data-testid=start]").click()
    second = wait_for(browser, f"return session && session !== '{first}' && session")
    with httpx.Client(base_url=live_server, timeout=30) as c:
        deadline = time.time() + 30
        while c.get(f"/sessions/{first}").status_code != 404 and time.time() < deadline:
            time.sleep(0.1)
        assert c.get(f"/sessions/{first}").status_code == 404 and c.get(f"/sessions/{second}").status_code == 200
    # A reply that is not JSON (here: the page itself) is an error the page shows, not a parser's message.
    browser.execute_script("api('GET', '/').catch(() => {});")
    error = wait_for(browser, "return document.querySelector('[data-testid=error]').textContent")
    assert "not JSON" in error and "Unexpected token" not in error
    # A 96x48 picture is shown 384x192, not stretched into the square.
    browser.execute_script(
        "const c = document.createElement('canvas'); c.width = 96; c.height = 48;"
        "c.getContext('2d').fillRect(0, 0, 96, 48); drawImage(c.toDataURL());"
    )
    wait_for(browser, "return document.querySelector('[data-testid=canvas]').style.height === '192px'")
    # A text-only model: the brush is off.
    browser.execute_script(
        "const m = document.querySelector('[data-testid=model]'); m.value = 'scene-sd';"
        "m.dispatchEvent(new Event('change'));"
    )
    wait_for(browser, "return document.querySelector('[data-testid=canvas]').classList.contains('nobrush')")
    # A late Undo: commit an edit on scene-ddpm, undo, and switch to scene-spade before the reply comes.
    browser.execute_script(
        "const m = document.querySelector('[data-testid=model]'); m.value = 'scene-ddpm';"
        "m.dispatchEvent(new Event('change'));"
    )
    wait_for(browser, "return !document.querySelector('[data-testid=canvas]').classList.contains('nobrush')")
    wait_for(browser, "return !document.querySelector('[data-testid=busy]').classList.contains('on')")  # scene in
    browser.execute_script("document.querySelector('[data-testid=stats]').dataset.edits = '';")
    browser.find_element("css selector", "[data-testid=start]").click()
    wait_for(browser, "return session && document.querySelector('[data-testid=stats]').dataset.edits === '0'")
    browser.execute_script("ctx.fillStyle = '#ff0000'; ctx.fillRect(4, 4, 8, 8); sendEdit();")
    wait_for(browser, "return document.querySelector('[data-testid=stats]').dataset.edits === '1'")
    browser.execute_script(
        "document.querySelector('[data-testid=undo]').click();"
        "const m = document.querySelector('[data-testid=model]'); m.value = 'scene-spade';"
        "m.dispatchEvent(new Event('change'));"
    )
    time.sleep(3)  # the undo's reply arrives after the switch
    wait_for(browser, "return document.querySelector('[data-testid=busy]').classList.contains('on') === false")
    colours = browser.execute_script(
        "const d = ctx.getImageData(0, 0, canvas.width, canvas.height).data; const s = new Set();"
        "for (let i = 0; i < d.length; i += 4) s.add(d[i] * 65536 + d[i + 1] * 256 + d[i + 2]); return [...s];"
    )
    assert len(colours) > 1 and colours != [0], "the label canvas was painted over"
    assert browser.find_element("css selector", "[data-testid=error]").text == ""
