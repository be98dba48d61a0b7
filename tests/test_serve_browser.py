"""`zoo serve` in a real headless Chromium (Debian's chromium and chromium-driver): search by text and by
a sketch drawn with the mouse, then a version page with its lineage and sample grid."""

from __future__ import annotations

import math
import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn

import modelzoo
from modelzoo.serve import create_app

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture
def server_url(quick_world: Path) -> Iterator[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(modelzoo.open(quick_world)), host="127.0.0.1", port=port,
                                           log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join()


@pytest.fixture
def browser() -> Iterator[object]:
    if CHROMIUM is None or CHROMEDRIVER is None:
        message = "no chromium/chromedriver (apt-get install chromium chromium-driver)"
        if os.environ.get("CI"):  # .ci/run installs them: there, their absence is a failure, not a skip
            pytest.fail(message)
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))  # the given driver: no download
    driver.implicitly_wait(20)
    yield driver
    driver.quit()


def rendered(driver, image) -> bool:  # type: ignore[no-untyped-def]
    return bool(driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", image))


def draw_disc(driver, canvas, radius: int = 60) -> None:  # type: ignore[no-untyped-def]
    """Concentric circles with the thick pen, pressed and dragged like a hand would, fill a disc."""
    from selenium.webdriver.common.action_chains import ActionChains

    actions = ActionChains(driver, duration=0)
    actions.move_to_element(canvas).click_and_hold()
    for r in range(4, radius, 8):
        for step in range(0, 25):
            angle = 2 * math.pi * step / 24
            actions.move_to_element_with_offset(canvas, round(r * math.cos(angle)), round(r * math.sin(angle)))
    actions.release().perform()


@pytest.mark.slow
def test_search_by_text_and_sketch_then_open_a_version_page(browser, server_url, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    driver = browser
    driver.get(server_url + "/")
    driver.find_element(By.NAME, "text").send_keys("a red circle")
    driver.find_element(By.ID, "search-button").click()
    rows = driver.find_elements(By.CSS_SELECTOR, "#results tr.hit")
    assert rows[0].get_attribute("data-ref") == "shapes-gan-red-circle@1"
    thumbnail = rows[0].find_element(By.CSS_SELECTOR, "img.thumb")
    assert rendered(driver, thumbnail)
    driver.save_screenshot(str(tmp_path / "search.png"))

    driver.find_element(By.NAME, "text").clear()
    driver.find_element(By.ID, "pen-red").click()
    Select(driver.find_element(By.ID, "pen-size")).select_by_visible_text("thick")
    canvas = driver.find_element(By.ID, "sketch-canvas")
    draw_disc(driver, canvas)
    red = driver.execute_script(
        "const d = arguments[0].getContext('2d').getImageData(128, 128, 1, 1).data; return [d[0], d[1], d[2]];",
        canvas)
    assert red[0] > 200 and red[1] < 50  # the disc is drawn where the mouse went
    driver.find_element(By.ID, "search-button").click()
    top3 = [row.get_attribute("data-ref") for row in driver.find_elements(By.CSS_SELECTOR, "#results tr.hit")[:3]]
    assert "shapes-gan-red-circle@1" in top3, top3

    driver.find_element(By.CSS_SELECTOR, 'tr.hit[data-ref="shapes-gan-red-circle@1"] a.ref').click()
    assert driver.find_element(By.TAG_NAME, "h1").text.startswith("shapes-gan-red-circle@1")
    assert driver.find_elements(By.CSS_SELECTOR, "svg.lineage rect")
    grid = driver.find_element(By.CSS_SELECTOR, "img.sample-grid")
    deadline = time.monotonic() + 30
    while not rendered(driver, grid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert rendered(driver, grid)
    if os.environ.get("ZOO_SCREENSHOTS"):  # refreshes the README's pictures, with an edit beside its parent
        driver.get(server_url + "/v/shapes-sd-no-blue@1?prompt=a+blue+circle&n=4")
        edited = driver.find_element(By.CSS_SELECTOR, "img.parent-grid")
        while not rendered(driver, edited) and time.monotonic() < deadline + 60:
            time.sleep(0.2)
        driver.save_screenshot(str(tmp_path / "edit.png"))
        for name in ("search", "edit"):
            shutil.copy(tmp_path / f"{name}.png", Path(os.environ["ZOO_SCREENSHOTS"]) / f"serve-{name}.png")
