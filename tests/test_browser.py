"""End to end in headless Chromium: studies sent over DICOM appear in priority order
without a reload; a study is opened and claimed. Screenshots go to test-artifacts/."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .harness import NodeProcess, call, wait_for

pytestmark = pytest.mark.slow
ARTIFACTS = Path(os.environ.get("CXRTRIAGE_TEST_ARTIFACTS", Path(__file__).parents[1] / "test-artifacts"))


@pytest.fixture
def browser(tmp_path: Path):
    chromium, driver_path = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
    if not chromium.exists() or not driver_path.exists():
        pytest.skip("headless browser test needs apt-get install chromium chromium-driver")
    os.environ["SE_OFFLINE"] = "true"  # never let Selenium Manager try to download anything
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(chromium)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-quic",
                 f"--user-data-dir={tmp_path / 'chromium'}", "--window-size=1400,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(driver_path)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def test_worklist_in_a_browser(tmp_path: Path, browser, database_url: str) -> None:
    from selenium.webdriver.common.by import By

    ARTIFACTS.mkdir(parents=True, exist_ok=True)

    def text(element_id: str) -> str:
        # One script call: the page redraws, so element references would go stale.
        return browser.execute_script(f"const e = document.getElementById('{element_id}'); return e ? e.innerText : '';")

    node = NodeProcess(tmp_path / "node", database_url).start()
    try:
        base = node.web_url()
        browser.get(base + "/")
        browser.execute_script("window.__loadedOnce = true;")
        wait_for(lambda: "0 studies" in text("status"), 30, "the empty worklist")

        demo = subprocess.run([sys.executable, "-m", "cxrtriage", "demo", "--port", str(node.port), "--studies", "7",
                               "--web", base + "/"], capture_output=True, text=True, timeout=300)
        assert demo.returncode == 0, demo.stdout + demo.stderr

        # The page redraws every 2 s: read each snapshot of the rows in one script call.
        snapshot = "return [...document.querySelectorAll('#worklist tbody tr')].map(r => [r.dataset.study, r.className, r.innerText]);"

        def scored_rows() -> list | None:
            rows = browser.execute_script(snapshot)
            if len(rows) != 8 or any("unscored" in cls for _, cls, _ in rows):
                return None
            return rows

        rows = wait_for(scored_rows, 300, "8 scored studies in the page")
        assert browser.execute_script("return window.__loadedOnce === true;")  # never reloaded
        page_order = [study for study, _, _ in rows]
        api_order = [e["study_instance_uid"] for e in call(f"{base}/api/worklist")[1]]
        assert page_order == api_order
        assert "STAT" in rows[0][2]  # the STAT order stays on top although the AI found nothing
        bands = [cls.removeprefix("band-") for _, cls, _ in rows[1:]]
        severity = {"critical": 0, "high": 1, "moderate": 2, "low": 3}
        assert [severity[b] for b in bands] == sorted(severity[b] for b in bands)
        # Models trained only on synthetic / CT-derived images: the notice and the model names are on screen.
        from cxrtriage.inference.presets import bundled

        names = [spec.display_name for spec in bundled()]
        banner = text("research-banner")
        assert "not trained on real radiographs" in banner and all(name in banner for name in names)
        assert all("research use" in row_text for _, _, row_text in rows)
        browser.save_screenshot(str(ARTIFACTS / "worklist.png"))

        browser.execute_script(f"document.querySelector('tr[data-study=\"{page_order[1]}\"] a').click();")  # most severe
        wait_for(lambda: "Accession" in text("title"), 30, "the study page")
        wait_for(lambda: browser.execute_script(
            "const i = document.querySelector('#images img'); return i && i.complete && i.naturalWidth > 0;"),
            30, "the overlay image")
        browser.find_element(By.ID, "reader").send_keys("dr_chromium")
        browser.find_element(By.ID, "claim").click()
        wait_for(lambda: "claimed (dr_chromium)" in text("state"), 30, "the claim")
        assert "not trained on real radiographs" in text("research-banner")
        assert all(name in text("models") for name in names) and "trained on" in text("models")
        browser.save_screenshot(str(ARTIFACTS / "study.png"))
        claimed = call(f"{base}/api/studies/{page_order[1]}")[1]
        assert claimed["reading_state"] == "claimed" and claimed["reader"] == "dr_chromium"
    finally:
        node.stop()
