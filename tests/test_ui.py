"""GET /ui in a real headless browser: the token prompt, generating with progress, cancelling, the gallery, safety.

One browser and one service for the module (the demo models at 64², a slow test
model for the queue and cancel). Screenshots of the main states are saved to
`$IMAGINE_SCREENSHOTS`, else to a folder of pytest's temporary directory.
"""

from __future__ import annotations

import configparser
import fnmatch
import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import Select, WebDriverWait

from imagine.devtools.demo_models import demo_settings
from imagine.http.app import create_app
from imagine.http.views.ui import FOLDER
from imagine.settings import Settings, load_settings
from tests.browser import chromium, console_errors
from tests.conftest import KEYS, make_token, pixels
from tests.fake_ollama import FakeOllama
from tests.served import serving
from tests.slow_plugin import SlowPlugin

ROOT = Path(__file__).resolve().parent.parent
WAIT_S = 30
HOSTILE_PROMPT = '<img src=x onerror="document.title=\'pwned\'">'


def ui_settings(state: Path, demo_folder: Path, **changes: Any) -> Settings:
    settings = demo_settings(load_settings(None, {"IMAGINE_SERVER_STATE_DIR": str(state)}), demo_folder)
    small = {"min_size": 64, "default_size": 64}
    options = {name: {**table, **small} for name, table in settings.models.options.items()}
    return settings.replace(
        models={"options": options, "preload": ["sdxl", "sdxl-turbo"]},
        ratelimit={"global_burst": 100_000, "ip_burst": 100_000, "subject_burst": 100_000},
        jobs={"preview_every": 1},
        **changes,
    )


@pytest.fixture(scope="module")
def slow() -> SlowPlugin:
    return SlowPlugin(step_seconds=0.05)


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, demo_folder: Path, slow: SlowPlugin) -> Iterator[str]:
    app = create_app(ui_settings(tmp_path_factory.mktemp("ui-state"), demo_folder), keys=KEYS, extra_plugins=[slow])
    with serving(app) as origin:
        yield origin + "/imagine"


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    with chromium() as driver:
        yield driver


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = Path(os.environ["IMAGINE_SCREENSHOTS"]) if os.environ.get("IMAGINE_SCREENSHOTS") else tmp_path_factory.mktemp("screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture
def expected_console() -> list[str]:
    """Console errors a test expects (the browser logs every 4xx answer): fragments of their text."""
    return []


@pytest.fixture
def driver(browser: WebDriver, expected_console: list[str]) -> Iterator[WebDriver]:
    """The module's browser; after each test its console holds no error but those the test expected."""
    console_errors(browser)
    yield browser
    unexpected = [e for e in console_errors(browser) if not any(part in e for part in expected_console)]
    assert unexpected == []


def api(base: str, method: str, path: str, token: str, body: Any = None) -> tuple[int, dict[str, str], bytes]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(base + path, data=data, method=method)
    request.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def wait(driver: WebDriver, condition: Any, message: str = "", timeout: float = WAIT_S) -> Any:
    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: condition(d), message)


def find(driver: WebDriver, css: str) -> WebElement:
    return driver.find_element(By.CSS_SELECTOR, css)


def text_of(driver: WebDriver, css: str) -> str:
    return find(driver, css).text


def open_page(driver: WebDriver, service: str, token: str | None) -> None:
    """The page as a new visitor sees it; with a token, pasted into its prompt."""
    driver.get(service + "/ui")
    driver.execute_script("sessionStorage.clear()")
    driver.get(service + "/ui")
    wait(driver, lambda d: find(d, "#token-panel").is_displayed(), "the token prompt")
    if token is not None:
        find(driver, "#token-input").send_keys(token)
        find(driver, "#token-form button").click()
        wait(driver, lambda d: find(d, "#generate-panel").is_displayed(), "the generate panel")


def fill(driver: WebDriver, css: str, value: Any) -> None:
    element = find(driver, css)
    element.clear()
    element.send_keys(str(value))


def choose_model(driver: WebDriver, name: str) -> None:
    Select(find(driver, "#model")).select_by_value(name)


def rendered_pixels(driver: WebDriver, image: WebElement) -> np.ndarray:
    """The pixels the browser decoded for an <img>, read back through a canvas."""
    width, height, data = driver.execute_script(
        """const img = arguments[0];
        const canvas = document.createElement("canvas");
        canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
        const context = canvas.getContext("2d");
        context.drawImage(img, 0, 0);
        return [canvas.width, canvas.height, Array.from(context.getImageData(0, 0, canvas.width, canvas.height).data)];""",
        image,
    )
    return np.array(data, dtype=np.uint8).reshape(height, width, 4)[..., :3]


def record_progress(driver: WebDriver) -> None:
    """Keep every value the progress bar takes and count the previews shown, however fast they come."""
    driver.execute_script(
        """window.seen = {progress: [], previews: 0};
        new MutationObserver(() => window.seen.progress.push(Number(document.getElementById("job-progress").value)))
          .observe(document.getElementById("job-progress"), {attributes: true, attributeFilter: ["value"]});
        new MutationObserver(() => window.seen.previews++)
          .observe(document.getElementById("job-preview"), {attributes: true, attributeFilter: ["src"]});"""
    )


def generate_on_page(driver: WebDriver, model: str, prompt: str, **fields: Any) -> WebElement:
    choose_model(driver, model)
    fill(driver, "#prompt", prompt)
    for name, value in fields.items():
        fill(driver, f"#{name}", value)
    find(driver, "#generate").click()
    wait(driver, lambda d: "Done" in text_of(d, "#job-status"), "the job's end")
    image = find(driver, "#results figure img")
    wait(driver, lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", image))
    return image


def gallery_tiles(driver: WebDriver) -> list[str]:
    return [tile.get_attribute("data-image-id") for tile in driver.find_elements(By.CSS_SELECTOR, "#gallery-grid .tile")]


def show_gallery(driver: WebDriver) -> None:
    find(driver, '#tabs button[data-panel="gallery-panel"]').click()
    wait(driver, lambda d: find(d, "#gallery-panel").is_displayed() and "image" in text_of(d, "#gallery-summary"))


def controls_without_labels(driver: WebDriver) -> list[str]:
    return driver.execute_script(
        """return [...document.querySelectorAll("input, select, textarea")]
          .filter((c) => c.offsetParent !== null && c.labels.length === 0 && !c.getAttribute("aria-label"))
          .map((c) => c.id || c.name);"""
    )


# ---- the tests ----------------------------------------------------------------------------


def test_the_page_asks_for_a_token_first_and_keeps_it_out_of_urls_and_cookies(
    driver: WebDriver, service: str, screenshots: Path, expected_console: list[str]
) -> None:
    open_page(driver, service, None)
    assert not find(driver, "#generate-panel").is_displayed()
    assert not find(driver, "#tabs").is_displayed()
    # Without a token the page calls nothing but its own files.
    loaded = driver.execute_script("return performance.getEntriesByType('resource').map((e) => new URL(e.name).pathname)")
    assert loaded and all(path.startswith("/imagine/ui/") for path in loaded), loaded
    assert controls_without_labels(driver) == []
    driver.save_screenshot(str(screenshots / "01-token-prompt.png"))

    expected_console.append("401")
    find(driver, "#token-input").send_keys("not-a-token")
    find(driver, "#token-form button").click()
    wait(driver, lambda d: "Invalid token" in text_of(d, "#token-message"), "the refusal, in words")
    assert find(driver, "#token-panel").is_displayed()

    token = make_token("visitor")
    find(driver, "#token-input").send_keys(token)
    find(driver, "#token-form button").click()
    wait(driver, lambda d: find(d, "#generate-panel").is_displayed())
    assert token not in driver.current_url
    assert driver.execute_script("return document.cookie") == ""
    assert driver.get_cookies() == []
    assert driver.execute_script("return sessionStorage.getItem('imagine.token')") == token


def test_the_page_and_its_files_carry_a_strict_content_security_policy(service: str) -> None:
    with urllib.request.urlopen(service + "/ui") as response:
        policy = response.headers["Content-Security-Policy"]
        html = response.read().decode()
    directives = dict(part.strip().split(" ", 1) for part in policy.split(";"))
    assert directives["default-src"] == "'none'"
    assert directives["script-src"] == "'self'"
    assert "unsafe" not in policy and "data:" not in policy
    assert directives["frame-ancestors"] == "'none'"
    # No inline script or style for the policy to refuse, and nothing from another origin.
    assert "<script>" not in html and "style=" not in html and "//" not in html.replace("<!--", "")
    for name in ("app.js", "style.css"):
        with urllib.request.urlopen(f"{service}/ui/{name}") as response:
            assert response.headers["Content-Security-Policy"] == policy
            assert response.headers["X-Content-Type-Options"] == "nosniff"
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(service + "/ui/..%2Fviews%2Fui.py")
    assert refused.value.code == 404


def test_every_page_file_is_installed_with_the_package() -> None:
    options = configparser.ConfigParser()
    options.read(ROOT / "setup.cfg")
    patterns = options["options.package_data"]["imagine.http"].replace(",", " ").split()
    shipped = [entry.name for entry in FOLDER.iterdir() if entry.is_file()]
    assert "index.html" in shipped
    assert [name for name in shipped if not any(fnmatch.fnmatch(f"ui/{name}", p) for p in patterns)] == []


def test_generate_shows_progress_previews_and_the_stored_image(driver: WebDriver, service: str, screenshots: Path) -> None:
    token = make_token("painter")
    open_page(driver, service, token)
    choose_model(driver, "sdxl")
    # The form holds the model's defaults and limits from /models.
    listing = json.loads(api(service, "GET", "/models", token)[2])["local_models"]["sdxl"]
    assert find(driver, "#width").get_attribute("value") == str(listing["defaults"]["width"])
    assert find(driver, "#steps").get_attribute("value") == str(listing["defaults"]["steps"])
    assert find(driver, "#guidance").get_attribute("value") == str(listing["defaults"]["guidance"])
    assert find(driver, "#width").get_attribute("max") == str(listing["limits"]["max_size"])
    assert find(driver, "#scheduler").get_attribute("value") == listing["defaults"]["scheduler"]
    assert controls_without_labels(driver) == []

    record_progress(driver)
    image = generate_on_page(driver, "sdxl", "a lighthouse at dusk", steps=20, seed=7)
    seen = driver.execute_script("return window.seen")
    assert seen["progress"][-1] == 20
    assert any(0 < value < 20 for value in seen["progress"]), seen["progress"]
    assert seen["progress"] == sorted(seen["progress"])
    assert seen["previews"] >= 1
    assert "seed 7" in text_of(driver, "#job-status")
    assert image.get_attribute("src").startswith("blob:")
    image_id = find(driver, "#results figure").get_attribute("data-image-id")
    status, _, png = api(service, "GET", f"/gallery/{image_id}.png", token)
    assert status == 200
    assert np.array_equal(rendered_pixels(driver, image), pixels(png))
    driver.save_screenshot(str(screenshots / "02-generated.png"))


def test_a_queued_job_shows_its_place_then_runs_and_cancels(
    driver: WebDriver, service: str, screenshots: Path, slow: SlowPlugin
) -> None:
    token = make_token("waiter")
    open_page(driver, service, token)
    # Another job holds the device, so the page's job waits behind it.
    status, _, body = api(service, "POST", "/jobs", token, {"prompt": "ahead", "model": "slow", "steps": 200})
    assert status == 202
    ahead = json.loads(body)["id"]
    deadline = time.monotonic() + WAIT_S
    while json.loads(api(service, "GET", f"/jobs/{ahead}", token)[2])["status"] != "running":
        assert time.monotonic() < deadline
        time.sleep(0.02)

    choose_model(driver, "slow")
    fill(driver, "#prompt", "a long one")
    fill(driver, "#steps", 400)
    find(driver, "#generate").click()
    wait(driver, lambda d: "position 1 in the queue" in text_of(d, "#job-status"), "the queue position")
    assert "about" in text_of(driver, "#job-status")
    driver.save_screenshot(str(screenshots / "03-queued.png"))

    assert api(service, "DELETE", f"/jobs/{ahead}", token)[0] == 200
    wait(driver, lambda d: int(find(d, "#job-progress").get_attribute("value")) >= 3, "the progress bar moving")
    assert "Running: step" in text_of(driver, "#job-status")
    assert find(driver, "#job-progress").get_attribute("max") == "400"
    driver.save_screenshot(str(screenshots / "04-running.png"))
    runs_before = len(slow.generator.finished_runs)
    find(driver, "#cancel").click()
    wait(driver, lambda d: text_of(d, "#job-status") == "Cancelled.", "the cancellation")
    assert find(driver, "#generate").is_enabled() and not find(driver, "#cancel").is_enabled()
    deadline = time.monotonic() + WAIT_S
    while len(slow.generator.finished_runs) == runs_before:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert slow.generator.finished_runs[-1] == "interrupted"


@pytest.fixture(scope="module")
def gallery_of_30(service: str) -> str:
    """A caller with 30 stored images: 16 forests on sdxl, 14 lighthouses on sdxl-turbo. Returns its token."""
    token = make_token("collector")
    for count, prompt, model in [(4, "a forest path", "sdxl")] * 4 + [(4, "a lighthouse", "sdxl-turbo")] * 3 + [
        (2, "a lighthouse", "sdxl-turbo")
    ]:
        body = {"prompt": prompt, "model": model, "steps": 2, "num_images": count, "response_format": "json"}
        assert api(service, "POST", "/generate", token, body)[0] == 200
    return token


def test_the_gallery_pages_searches_and_filters(driver: WebDriver, service: str, screenshots: Path, gallery_of_30: str) -> None:
    open_page(driver, service, gallery_of_30)
    show_gallery(driver)
    assert text_of(driver, "#gallery-summary") == "30 images"
    assert text_of(driver, "#gallery-page") == "Page 1 of 3"
    first = gallery_tiles(driver)
    assert len(first) == 12 and not find(driver, "#gallery-next").get_attribute("disabled")
    assert find(driver, "#gallery-prev").get_attribute("disabled")
    driver.save_screenshot(str(screenshots / "05-gallery.png"))
    find(driver, "#gallery-next").click()
    wait(driver, lambda d: text_of(d, "#gallery-page") == "Page 2 of 3")
    second = gallery_tiles(driver)
    find(driver, "#gallery-next").click()
    wait(driver, lambda d: text_of(d, "#gallery-page") == "Page 3 of 3")
    third = gallery_tiles(driver)
    assert (len(second), len(third)) == (12, 6)
    assert len(set(first) | set(second) | set(third)) == 30
    assert find(driver, "#gallery-next").get_attribute("disabled")
    # Newest first, as the API lists them.
    listed = json.loads(api(service, "GET", "/gallery?limit=30", gallery_of_30)[2])["images"]
    assert first + second + third == [item["id"] for item in listed]

    fill(driver, "#gallery-q", "FOREST")
    find(driver, "#gallery-filter button").click()
    wait(driver, lambda d: text_of(d, "#gallery-summary") == "16 images")
    assert text_of(driver, "#gallery-page") == "Page 1 of 2"
    Select(find(driver, "#gallery-model")).select_by_value("sdxl-turbo")
    find(driver, "#gallery-filter button").click()
    wait(driver, lambda d: text_of(d, "#gallery-summary") == "0 images")
    find(driver, "#gallery-q").clear()
    find(driver, "#gallery-filter button").click()
    wait(driver, lambda d: text_of(d, "#gallery-summary") == "14 images")


def test_an_image_opens_with_its_settings_which_fill_the_form_and_it_can_be_deleted(
    driver: WebDriver, service: str, screenshots: Path, gallery_of_30: str
) -> None:
    open_page(driver, service, gallery_of_30)
    show_gallery(driver)
    total = int(text_of(driver, "#gallery-summary").split()[0])
    tile_id = gallery_tiles(driver)[0]
    find(driver, "#gallery-grid .tile").click()
    wait(driver, lambda d: find(d, "#image-dialog").is_displayed())
    item = json.loads(api(service, "GET", f"/gallery/{tile_id}", gallery_of_30)[2])
    details = text_of(driver, "#dialog-params")
    assert item["prompt"] in details and str(item["seed"]) in details and tile_id in details
    assert find(driver, "#dialog-download").get_attribute("download") == f"{tile_id}.png"
    assert find(driver, "#dialog-download").get_attribute("href").startswith("blob:")
    driver.save_screenshot(str(screenshots / "06-image-details.png"))

    find(driver, "#dialog-use").click()
    wait(driver, lambda d: find(d, "#generate-panel").is_displayed())
    values = {name: find(driver, f"#{name}").get_attribute("value") for name in ("model", "prompt", "seed", "steps", "width", "height")}
    assert values == {
        "model": item["model"],
        "prompt": item["prompt"],
        "seed": str(item["seed"]),
        "steps": str(item["parameters"]["num_inference_steps"]),
        "width": str(item["width"]),
        "height": str(item["height"]),
    }

    show_gallery(driver)
    find(driver, "#gallery-grid .tile").click()
    wait(driver, lambda d: find(d, "#image-dialog").is_displayed())
    find(driver, "#dialog-delete").click()
    find(driver, "#dialog-delete-yes").click()
    wait(driver, lambda d: f"Deleted {tile_id}" in text_of(d, "#gallery-summary"))
    assert f"{total - 1} images" in text_of(driver, "#gallery-summary")
    assert tile_id not in gallery_tiles(driver)
    assert api(service, "GET", f"/gallery/{tile_id}", gallery_of_30)[0] == 404


def test_a_prompt_with_html_is_shown_as_text(driver: WebDriver, service: str, screenshots: Path) -> None:
    token = make_token("mallory")
    open_page(driver, service, token)
    generate_on_page(driver, "sdxl-turbo", HOSTILE_PROMPT, steps=1)
    show_gallery(driver)
    find(driver, "#gallery-grid .tile").click()
    wait(driver, lambda d: find(d, "#image-dialog").is_displayed())
    prompt = driver.find_elements(By.CSS_SELECTOR, "#dialog-params dd")[0]
    assert prompt.text == HOSTILE_PROMPT
    assert driver.find_elements(By.CSS_SELECTOR, 'img[src="x"]') == []
    assert driver.title != "pwned"
    driver.save_screenshot(str(screenshots / "07-html-prompt-as-text.png"))
    find(driver, "#dialog-close").click()


def test_an_expired_token_asks_for_a_new_one(driver: WebDriver, service: str, expected_console: list[str]) -> None:
    expected_console.append("401")
    open_page(driver, service, make_token("forgetful"))
    expired = make_token("forgetful", exp=int(time.time()) - 3600)
    driver.execute_script("sessionStorage.setItem('imagine.token', arguments[0])", expired)
    fill(driver, "#prompt", "too late")
    find(driver, "#generate").click()
    wait(driver, lambda d: find(d, "#token-panel").is_displayed(), "the token prompt again")
    assert "Invalid token" in text_of(driver, "#token-message")
    assert "expired" in text_of(driver, "#token-message").lower()
    assert driver.execute_script("return sessionStorage.getItem('imagine.token')") is None


def test_a_rate_limited_request_says_how_long_to_wait(
    driver: WebDriver, tmp_path: Path, demo_folder: Path, expected_console: list[str]
) -> None:
    expected_console.append("429")
    # Two requests a subject may make (the page's /models and /status), then one token a minute.
    settings = ui_settings(tmp_path / "state", demo_folder)
    settings = settings.replace(ratelimit={"subject_burst": 2, "subject_rate": 1 / 60})
    with serving(create_app(settings, keys=KEYS)) as origin:
        open_page(driver, origin + "/imagine", make_token("hasty"))
        fill(driver, "#prompt", "one more")
        find(driver, "#generate").click()
        wait(driver, lambda d: "Rate limit exceeded" in text_of(d, "#generate-message"))
        message = text_of(driver, "#generate-message")
        wait_s = int(message.rsplit("Try again in ", 1)[1].split(" ")[0])
        assert 1 <= wait_s <= 60
        assert find(driver, "#generate").is_enabled()


def test_at_a_phones_width_in_dark_mode_nothing_overflows(
    driver: WebDriver, service: str, screenshots: Path, gallery_of_30: str
) -> None:
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {"width": 390, "height": 844, "deviceScaleFactor": 2, "mobile": True})
    driver.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": [{"name": "prefers-color-scheme", "value": "dark"}]})
    try:
        open_page(driver, service, gallery_of_30)
        overflow = "return document.documentElement.scrollWidth - document.documentElement.clientWidth"
        assert driver.execute_script(overflow) <= 0
        background = driver.execute_script("return getComputedStyle(document.body).backgroundColor")
        red, green, blue = (int(part) for part in background[background.index("(") + 1 : -1].split(",")[:3])
        assert max(red, green, blue) < 64, background
        assert controls_without_labels(driver) == []
        driver.save_screenshot(str(screenshots / "08-phone-dark-generate.png"))
        show_gallery(driver)
        assert driver.execute_script(overflow) <= 0
        driver.save_screenshot(str(screenshots / "09-phone-dark-gallery.png"))
    finally:
        driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
        driver.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": []})


def test_the_whole_form_works_from_the_keyboard(driver: WebDriver, service: str) -> None:
    open_page(driver, service, make_token("keyboard"))
    choose_model(driver, "sdxl-turbo")
    fill(driver, "#prompt", "typed, not clicked")
    fill(driver, "#steps", 1)
    # From the prompt, Tab reaches the Generate button, and Enter presses it.
    find(driver, "#prompt").click()
    for _ in range(40):
        if driver.switch_to.active_element.get_attribute("id") == "generate":
            break
        # Keys go to whatever has the focus, as a user's would (a file input included).
        ActionChains(driver).send_keys(Keys.TAB).perform()
    assert driver.switch_to.active_element.get_attribute("id") == "generate"
    ActionChains(driver).send_keys(Keys.ENTER).perform()
    wait(driver, lambda d: "Done" in text_of(d, "#job-status"))


def test_the_assistant_chats_as_text_shows_generated_images_and_improves_prompts(
    driver: WebDriver, tmp_path: Path, demo_folder: Path, screenshots: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The fake Ollama (a real HTTP server speaking its protocol) answers chats by echoing them.
    monkeypatch.delenv("OLLAMA_API_KEY", raising=False)
    with serving(FakeOllama().app()) as ollama:
        settings = ui_settings(tmp_path / "state", demo_folder, assistant={"ollama_url": ollama})
        options = {**settings.models.options, "sdxl": {**settings.models.options["sdxl"], "default_steps": 2}}
        with serving(create_app(settings.replace(models={"options": options}), keys=KEYS)) as origin:
            token = make_token("talker")
            open_page(driver, origin + "/imagine", token)
            assert find(driver, "#enhance").is_displayed()
            fill(driver, "#prompt", "a fox")
            find(driver, "#enhance").click()
            wait(driver, lambda d: find(d, "#prompt").get_attribute("value") not in ("", "a fox"), "a better prompt")

            find(driver, "#chat-tab").click()
            fill(driver, "#chat-input", "hello <b>there</b>")
            find(driver, "#chat-send").click()
            wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#chat-log li")) == 2 and "there" in text_of(d, "#chat-log li:last-child p"))
            assert "<b>there</b>" in text_of(driver, "#chat-log li:first-child p")
            assert driver.find_elements(By.CSS_SELECTOR, "#chat-log b") == []

            fill(driver, "#chat-input", "#generate a red fox")
            find(driver, "#chat-send").click()
            image = wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#chat-log li:last-child img.chat-image"), "the image inline")[0]
            wait(driver, lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", image))
            assert image.get_attribute("src").startswith("blob:")
            listed = json.loads(api(origin + "/imagine", "GET", "/gallery", token)[2])["images"]
            assert [item["prompt"] for item in listed] == ["a red fox"]
            assert listed[0]["id"] in text_of(driver, "#chat-log li:last-child p")
            _, _, png = api(origin + "/imagine", "GET", f"/gallery/{listed[0]['id']}.png", token)
            assert np.array_equal(rendered_pixels(driver, image), pixels(png))
            driver.save_screenshot(str(screenshots / "10-assistant.png"))


def test_a_gallery_image_becomes_the_input_and_a_painted_mask_is_sent(
    driver: WebDriver, service: str, screenshots: Path, gallery_of_30: str
) -> None:
    open_page(driver, service, gallery_of_30)
    show_gallery(driver)
    source = gallery_tiles(driver)[0]
    find(driver, "#gallery-grid .tile").click()
    wait(driver, lambda d: find(d, "#image-dialog").is_displayed())
    find(driver, "#dialog-input").click()
    wait(driver, lambda d: find(d, "#mask-canvas").is_displayed(), "the mask editor")
    assert source in text_of(driver, "#init-name")
    canvas = find(driver, "#mask-canvas")
    ActionChains(driver).move_to_element_with_offset(canvas, -40, -40).click_and_hold().move_by_offset(60, 30).release().perform()
    fill(driver, "#strength", 0.5)
    fill(driver, "#prompt", "the same, with a moon")
    driver.save_screenshot(str(screenshots / "11-mask.png"))
    find(driver, "#generate").click()
    wait(driver, lambda d: "Done" in text_of(d, "#job-status") or text_of(d, "#generate-message"), "the job's end")
    assert text_of(driver, "#generate-message") == ""
    made = find(driver, "#results figure").get_attribute("data-image-id")
    parameters = json.loads(api(service, "GET", f"/gallery/{made}", gallery_of_30)[2])["parameters"]
    assert parameters["strength"] == 0.5 and parameters["mask_hash"] and parameters["image_hash"]
