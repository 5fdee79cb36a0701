"""The sync health page in a real browser (headless Chromium) against a live stack.

A healthy source (the management console simulator) and a failing one (a connection to the same
simulator with a wrong API token) are synced once; the browser logs in to the Airflow UI, opens the
**Defender ⇄ ServiceNow** page, checks both rows, follows the failing row's log link and sees the log.
The screenshot is saved as ``health-page.png`` under the test's temporary folder.

Needs Debian's ``chromium`` and ``chromium-driver`` (``apt-get install -y chromium chromium-driver``);
skipped with a one-line reason without them.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

from scripts.stack import DEFENDER_CONN_ID, USERNAME, Stack, StackOptions

pytestmark = pytest.mark.live

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
BROKEN = "defender_iot_broken"
WRONG_TOKEN = "wrong-token-for-the-health-page-test"

if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
    pytest.skip("needs /usr/bin/chromium and chromedriver (apt-get install -y chromium chromium-driver)",
                allow_module_level=True)
webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (requirements-dev.txt)")


class _StackWithABrokenSource(Stack):
    def _environment(self, api_port: int) -> dict[str, str]:
        env = super()._environment(api_port)
        env[f"AIRFLOW_CONN_{BROKEN.upper()}"] = json.dumps({
            "conn_type": "defender_iot", "host": self.defender_url, "password": WRONG_TOKEN,
            "extra": {"appliance": "management_console", "name": "broken-console"}})
        env["DEFENDER_SOURCES"] = f"{DEFENDER_CONN_ID},{BROKEN}"
        return env


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    live = _StackWithABrokenSource(StackOptions(home=tmp_path_factory.mktemp("health") / "airflow_home",
                                                devices=20, sensors=1, fast=True))
    try:
        live.start()
        live.wait_for_dags(("defender_device_sync",))
        yield live
    finally:
        live.stop()


@pytest.fixture
def browser(tmp_path):
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1440,900", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.implicitly_wait(0)
    try:
        yield driver
    finally:
        driver.quit()


def _wait(driver, condition, what: str, timeout: float = 60):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.5).until(condition, message=f"waiting for {what}")


def test_health_page_shows_a_healthy_and_a_failing_source_and_links_the_log(stack, browser, tmp_path):
    from selenium.webdriver.common.by import By

    run_id = stack.trigger("defender_device_sync")
    stack.wait_for_run("defender_device_sync", run_id)
    states = {t.get("rendered_map_index"): t["state"] for t in stack.task_instances("defender_device_sync", run_id)
              if t["task_id"] == "sync_source"}
    assert states == {DEFENDER_CONN_ID: "success", BROKEN: "failed"}, states

    # Log in through the UI's own form (SimpleAuthManager).
    browser.get(f"{stack.api_url}/auth/login/")
    _wait(browser, lambda d: d.find_elements(By.NAME, "username"), "the login form")
    browser.find_element(By.NAME, "username").send_keys(USERNAME)
    browser.find_element(By.NAME, "password").send_keys(stack.password)
    browser.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    _wait(browser, lambda d: "/auth/login" not in d.current_url and d.get_cookie("_token"), "the login")

    # The navigation entry opens the page inside the Airflow UI.
    browser.get(stack.api_url + "/")
    nav = _wait(browser, lambda d: d.find_elements(By.XPATH, "//*[normalize-space(text())='Defender ⇄ ServiceNow']"),
                "the navigation entry")
    nav[0].click()
    frame = _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "iframe[src*='/defender-servicenow/']"),
                  "the page's frame")[0]
    browser.switch_to.frame(frame)
    rows = _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "tr.source"), "the source rows")
    by_source = {r.get_attribute("data-source"): r for r in rows}
    assert set(by_source) == {DEFENDER_CONN_ID, BROKEN}

    healthy, failing = by_source[DEFENDER_CONN_ID], by_source[BROKEN]
    assert healthy.get_attribute("data-status") == "ok", healthy.text
    assert "OK" in healthy.text and "Management console" in healthy.text and "ago" in healthy.text
    assert "seen 20" in " ".join(healthy.text.split()) or "seen" in healthy.text
    assert failing.get_attribute("data-status") == "failing", failing.text
    assert "Failing" in failing.text and "never" in failing.text

    browser.switch_to.default_content()
    shot = tmp_path / "health-page.png"
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    print(f"screenshot: {shot}")

    page = browser.page_source
    assert not [s for s in stack.secrets() + [WRONG_TOKEN] if s in page]

    browser.switch_to.frame(frame)
    link = failing.find_element(By.CSS_SELECTOR, "a.log")
    assert "/dags/defender_device_sync/runs/" in link.get_attribute("href")
    link.click()  # target=_top: the Airflow UI opens the task instance on its log
    browser.switch_to.default_content()
    _wait(browser, lambda d: "/tasks/sync_source" in d.current_url, "the task instance page")
    _wait(browser, lambda d: BROKEN in d.find_element(By.TAG_NAME, "body").text
          and "failed" in d.find_element(By.TAG_NAME, "body").text.lower(), "the failing task's log", timeout=90)
    browser.save_screenshot(str(tmp_path / "failing-task-log.png"))
