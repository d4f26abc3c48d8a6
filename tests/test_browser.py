"""End to end in headless Chromium: studies sent over DICOM appear in priority order
without a reload, with the patient's name and ID and a legend; a study is opened, its
overlay toggled against the plain radiograph and zoomed, and claimed; /docs renders
from the node's own files. Screenshots go to test-artifacts/, and also to the folder
named by CXRTRIAGE_SCREENSHOTS (``CXRTRIAGE_SCREENSHOTS=docs/screenshots`` refreshes the
pictures in the docs; unset in CI so the tree stays clean)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from .harness import NodeProcess, call, wait_for

pytestmark = pytest.mark.slow
ARTIFACTS = Path(os.environ.get("CXRTRIAGE_TEST_ARTIFACTS", Path(__file__).parents[1] / "test-artifacts"))


def save_screenshot(browser, name: str) -> None:
    """To test-artifacts/, and to $CXRTRIAGE_SCREENSHOTS (the docs' pictures) when set."""
    docs = os.environ.get("CXRTRIAGE_SCREENSHOTS")
    folders = [ARTIFACTS] + ([Path(docs)] if docs else [])
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
        assert browser.save_screenshot(str(folder / name)), folder / name


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
        # The patient as DICOM PN "PHANTOM^<seed>" is shown "PHANTOM, <seed>", with the ID (7 phantoms + RG1).
        assert sum(bool(re.search(r"PHANTOM, \d+ · ID PH\d{8}", row_text)) for _, _, row_text in rows) == 7
        browser.execute_script("document.querySelector('#legend summary').click();")
        legend = text("legend")
        assert "Brixia-style grade" in legend and "s1 g2" in legend and "critical" in legend
        browser.execute_script("document.querySelector('#nodes summary').click();")
        nodes = text("nodes")  # the node list: one node here
        assert "Nodes (1 live)" in nodes and "testnode: receiver, scorer, sender, scheduler, web" in nodes
        save_screenshot(browser, "worklist.png")

        browser.execute_script(f"document.querySelector('tr[data-study=\"{page_order[1]}\"] a').click();")  # most severe
        wait_for(lambda: "Accession" in text("title"), 30, "the study page")
        image_shown = ("const i = document.querySelector('#images img'); "
                       "return i && i.complete && i.naturalWidth > 0 ? i.getAttribute('src') : null;")
        assert wait_for(lambda: browser.execute_script(image_shown), 30, "the overlay image").endswith("/overlay.png")
        assert re.fullmatch(r"Patient PHANTOM, \d+ · ID PH\d{8}", text("patient"))
        browser.find_element(By.CSS_SELECTOR, "#images .toggle").click()  # the plain radiograph
        plain = wait_for(lambda: (lambda src: src if src and src.endswith("/image.png") else None)(
            browser.execute_script(image_shown)), 30, "the plain image")
        with urllib.request.urlopen(base + plain) as response:
            assert response.read(8) == b"\x89PNG\r\n\x1a\n"
        browser.find_element(By.CSS_SELECTOR, "#images .zoom-in").click()
        assert browser.execute_script("return document.querySelector('#images img').style.width;") == "150%"
        browser.execute_script("document.querySelector('#images .frame').dispatchEvent("
                               "new WheelEvent('wheel', {deltaY: -100, cancelable: true}));")
        assert browser.execute_script("return document.querySelector('#images img').style.width;") == "188%"
        browser.find_element(By.CSS_SELECTOR, "#images .zoom-fit").click()
        browser.find_element(By.CSS_SELECTOR, "#images .toggle").click()  # back to the overlay
        assert wait_for(lambda: browser.execute_script(image_shown), 30, "the overlay again").endswith("/overlay.png")
        browser.find_element(By.ID, "reader").send_keys("dr_chromium")
        browser.find_element(By.ID, "claim").click()
        # No authentication configured: the node records the typed name as unauthenticated.
        wait_for(lambda: "claimed (unauthenticated:dr_chromium)" in text("state"), 30, "the claim")
        assert "not trained on real radiographs" in text("research-banner")
        assert all(name in text("models") for name in names) and "trained on" in text("models")
        browser.execute_script("document.querySelector('#legend summary').click();")
        assert "Overlay labels" in text("legend")
        save_screenshot(browser, "study.png")
        claimed = call(f"{base}/api/studies/{page_order[1]}")[1]
        assert claimed["reading_state"] == "claimed" and claimed["reader"] == "unauthenticated:dr_chromium"
        audit = call(f"{base}/api/audit?study={page_order[1]}")[1]
        assert [(e["action"], e["actor"]) for e in audit] == [("claim", "unauthenticated:dr_chromium")]

        # /docs: Swagger UI from the node's own files, started by a script file (the CSP allows no other).
        browser.get(base + "/docs")
        wait_for(lambda: "cxrtriage worklist" in browser.execute_script(
            "const t = document.querySelector('.swagger-ui .title'); return t ? t.innerText : '';"), 30, "Swagger UI")
    finally:
        node.stop()
