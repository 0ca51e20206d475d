"""/docs in a real browser: headless Chromium (Debian's chromium and chromium-driver, driven by Selenium) goes from
the landing page to the docs, finds the embeddings route, runs the page's own example request ("Try it out",
"Execute") and reads the answer back, which must be the vectors sentence-transformers gives. A screenshot of the
page is written to test-artifacts/docs-page.png (or $EMBEDSERVE_ARTIFACTS)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from serving import run_server

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
ARTIFACTS = Path(os.environ.get("EMBEDSERVE_ARTIFACTS", Path(__file__).resolve().parents[2] / "test-artifacts"))

if not (CHROMIUM and CHROMEDRIVER):
    if os.environ.get("EMBEDSERVE_REQUIRE_BROWSER"):  # .ci/run installs both and sets this: never skip in CI
        raise RuntimeError("EMBEDSERVE_REQUIRE_BROWSER is set but chromium / chromedriver are not installed")
    pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)",
                allow_module_level=True)


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,2200"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def test_the_docs_page_runs_the_embeddings_example_and_shows_the_answer(tmp_path, browser, st_embed):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 60)
    with run_server(tmp_path) as server:
        browser.get(server.url + "/")
        browser.find_element(By.PARTIAL_LINK_TEXT, "API documentation").click()
        assert browser.current_url == server.url + "/docs"
        op = wait.until(EC.presence_of_element_located((By.ID, "operations-embeddings-post_v1_embeddings")))
        assert "/v1/embeddings" in op.text
        op.find_element(By.CSS_SELECTOR, ".opblock-summary").click()
        wait.until(EC.element_to_be_clickable((By.CSS_SELECTOR, "#operations-embeddings-post_v1_embeddings "
                                                                ".try-out__btn"))).click()
        op.find_element(By.CSS_SELECTOR, "button.execute").click()
        body = wait.until(EC.visibility_of_element_located(
            (By.CSS_SELECTOR, "#operations-embeddings-post_v1_embeddings .live-responses-table "
                              ".response-col_description pre")))
        wait.until(lambda _: body.text.strip().endswith("}"))
        status = op.find_element(By.CSS_SELECTOR, ".live-responses-table .response .response-col_status").text
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shot = ARTIFACTS / "docs-page.png"
        browser.save_screenshot(str(shot))
        print(f"screenshot of /docs after Execute: {shot}")
    assert status.strip() == "200"
    answer = json.loads(body.text)
    texts = ["The food was delicious.", "A quick brown fox."]  # the example the OpenAPI document carries
    got = np.array([d["embedding"] for d in answer["data"]])
    np.testing.assert_allclose(got, st_embed(texts), atol=1e-5)
    assert shot.stat().st_size > 10_000
