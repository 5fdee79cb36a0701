"""The sync health page in a real browser (headless Chromium) against a live stack.

A healthy source (the management console simulator) and a failing one (a connection to the same
simulator with a wrong API token) are synced once; the browser logs in to the Airflow UI, opens the
**Defender ⇄ ServiceNow** page, checks both rows (counts, the failure sentence), checks the layout at two
laptop sizes (1366x768, 1440x900: no horizontal scrolling; screenshots ``health-page-<w>x<h>.png`` under
the test's temporary folder), sees the page refresh itself after a run changed the recorded ServiceNow
state, follows the failing row's log link and sees the log, and opens a DAG's trigger form from the page.

Needs Debian's ``chromium`` and ``chromium-driver`` (``apt-get install -y chromium chromium-driver``);
skipped with a one-line reason without them.
"""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest

from scripts.stack import DEFENDER_CONN_ID, USERNAME, Stack, StackOptions

pytestmark = pytest.mark.live

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
BROKEN = "defender_iot_broken"
WRONG_TOKEN = "wrong-token-for-the-health-page-test"
DEVICES = 20
REFRESH_SECONDS = 2
LAPTOPS = ((1366, 768), (1440, 900))

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
        env["DEFENDER_HEALTH_REFRESH_SECONDS"] = str(REFRESH_SECONDS)
        return env


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    live = _StackWithABrokenSource(StackOptions(home=tmp_path_factory.mktemp("health") / "airflow_home",
                                                devices=DEVICES, sensors=1, fast=True))
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


def _text(element) -> str:
    return " ".join(element.text.split())


def _login(browser, stack):
    from selenium.webdriver.common.by import By

    browser.get(f"{stack.api_url}/auth/login/")
    _wait(browser, lambda d: d.find_elements(By.NAME, "username"), "the login form")
    browser.find_element(By.NAME, "username").send_keys(USERNAME)
    browser.find_element(By.NAME, "password").send_keys(stack.password)
    browser.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    _wait(browser, lambda d: "/auth/login" not in d.current_url and d.get_cookie("_token"), "the login")


def _open_page_frame(browser, stack):
    """Open the page through its navigation entry; return its frame (the browser is switched into it)."""
    from selenium.webdriver.common.by import By

    browser.switch_to.default_content()
    browser.get(stack.api_url + "/")
    nav = _wait(browser, lambda d: d.find_elements(By.XPATH, "//*[normalize-space(text())='Defender ⇄ ServiceNow']"),
                "the navigation entry")
    nav[0].click()
    frame = _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "iframe[src*='/defender-servicenow/']"),
                  "the page's frame")[0]
    browser.switch_to.frame(frame)
    _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "tr.source"), "the source rows")
    return frame


def _rows(browser) -> dict:
    from selenium.webdriver.common.by import By

    return {r.get_attribute("data-source"): r for r in browser.find_elements(By.CSS_SELECTOR, "tr.source")}


def test_health_page_shows_a_healthy_and_a_failing_source_and_links_the_log(stack, browser, tmp_path):
    from selenium.webdriver.common.by import By

    run_id = stack.trigger("defender_device_sync")
    stack.wait_for_run("defender_device_sync", run_id)
    states = {t.get("rendered_map_index"): t["state"] for t in stack.task_instances("defender_device_sync", run_id)
              if t["task_id"] == "sync_source"}
    assert states == {DEFENDER_CONN_ID: "success", BROKEN: "failed"}, states

    _login(browser, stack)
    frame = _open_page_frame(browser, stack)
    by_source = _rows(browser)
    assert set(by_source) == {DEFENDER_CONN_ID, BROKEN}

    healthy, failing = _text(by_source[DEFENDER_CONN_ID]), _text(by_source[BROKEN])
    print(f"healthy row: {healthy}\nfailing row: {failing}")
    assert by_source[DEFENDER_CONN_ID].get_attribute("data-status") == "ok", healthy
    assert "OK" in healthy and "Management console" in healthy and " s ago" in healthy
    counts = {k: int(v) for k, v in re.findall(r"\b(seen|inserted|updated|unchanged|retired|skipped|failed) (\d+)",
                                                 healthy)}
    # The scheduler's first run may have synced before the triggered one: then this one found them unchanged.
    assert counts["seen"] == DEVICES and counts["failed"] == 0 and counts["skipped"] == 0, counts
    assert counts["inserted"] + counts["updated"] + counts["unchanged"] == DEVICES, counts
    assert "none recorded" in healthy                                       # no failure
    assert by_source[BROKEN].get_attribute("data-status") == "failing", failing
    assert "Failing" in failing and "never" in failing and "no sync recorded" in failing
    # The last failure is the DAG's own sentence: what Defender answered and what to do. The first run that
    # met the wrong token says so; a later one (the scheduler's run came first) is held by the lock-out guard.
    assert f"Sync of {BROKEN} failed:" in failing and "open the log" in failing
    if len(stack.runs("defender_device_sync")) == 1:
        said = "rejected the API access token (HTTP 401)"
        assert said in failing and "generate a new token" in failing
    else:
        said = "its credentials were rejected at"
        assert said in failing and "answered HTTP 401)" in failing and "Fix the connection's credentials" in failing
    status = browser.find_element(By.CSS_SELECTOR, "[data-servicenow-status]")
    assert status.get_attribute("data-servicenow-status") == "ok" and status.text == "OK"

    # Laptop screens: nothing wider than the window, every cell's text inside its cell.
    for width, height in LAPTOPS:
        browser.switch_to.default_content()
        browser.set_window_size(width, height)
        browser.switch_to.frame(frame)
        overflow = browser.execute_script("""
            var d = document.documentElement, cut = [];
            document.querySelectorAll("td, th").forEach(function (c) {
              if (c.scrollWidth > c.clientWidth + 1) { cut.push(c.textContent.trim().slice(0, 40)); } });
            return {page: d.scrollWidth - d.clientWidth, cut: cut, width: d.clientWidth};""")
        assert overflow["page"] <= 0 and overflow["cut"] == [], (width, height, overflow)
        browser.switch_to.default_content()
        shot = tmp_path / f"health-page-{width}x{height}.png"
        browser.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
        print(f"screenshot: {shot} (frame {overflow['width']} px wide)")
        browser.switch_to.frame(frame)

    page = browser.page_source
    assert not [s for s in stack.secrets() + [WRONG_TOKEN] if s in page]

    # It refreshes by itself: ServiceNow starts rejecting the credentials, a full resync of the healthy
    # source records that, and the open page (not reloaded) shows it within a few refreshes.
    browser.execute_script("window.__not_reloaded = true;")
    stack.sn_faults(reject_credentials=True, revoke_tokens=True)
    again = stack.trigger("defender_device_sync", {"sources": [DEFENDER_CONN_ID], "full_resync": True})
    stack.wait_for_run("defender_device_sync", again)
    _wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, "[data-servicenow-status]")
          .get_attribute("data-servicenow-status") == "credentials_rejected", "the refreshed ServiceNow state",
          timeout=10 * REFRESH_SECONDS + 10)
    assert browser.execute_script("return window.__not_reloaded === true;")
    refreshed = _text(_rows(browser)[DEFENDER_CONN_ID])
    assert _rows(browser)[DEFENDER_CONN_ID].get_attribute("data-status") == "failing", refreshed
    assert "Credentials rejected" in _text(browser.find_element(By.CSS_SELECTOR, ".bar"))
    stack.sn_faults(reject_credentials=False, revoke_tokens=False)

    link = _rows(browser)[BROKEN].find_element(By.CSS_SELECTOR, "a.log")
    assert "/dags/defender_device_sync/runs/" in link.get_attribute("href")
    link.click()  # target=_top: the Airflow UI opens the task instance on its log
    browser.switch_to.default_content()
    _wait(browser, lambda d: "/tasks/sync_source" in d.current_url, "the task instance page")
    _wait(browser, lambda d: said in d.find_element(By.TAG_NAME, "body").text, "the failing task's log", timeout=90)
    browser.save_screenshot(str(tmp_path / "failing-task-log.png"))


def _demo_page_address(stack, capsys) -> str:
    """The sync health page's address as ``make demo`` prints it (scripts/demo.py's banner)."""
    from types import SimpleNamespace

    from scripts.demo import print_banner

    print_banner(stack, SimpleNamespace(source="console", devices=DEVICES, alert_interval=0, check=True))
    banner = capsys.readouterr().out
    line = next(line for line in banner.splitlines() if "Sync health page" in line)
    return line.split()[3]


def test_the_demo_address_and_the_trigger_link_open_the_dags_trigger_form(stack, browser, tmp_path, capsys):
    from selenium.webdriver.common.by import By

    address = _demo_page_address(stack, capsys)
    assert address == f"{stack.api_url}/plugin/defender-servicenow", address
    _login(browser, stack)
    browser.get(address)    # the address make demo prints shows the page inside the Airflow UI
    frame = _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "iframe[src*='/defender-servicenow/']"),
                  "the page's frame at the demo's address")[0]
    browser.switch_to.frame(frame)
    _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "tr.source"), "the source rows")
    trigger = browser.find_element(By.CSS_SELECTOR, "a.trigger[href$='/dags/defender_device_sync']")
    trigger.click()
    browser.switch_to.default_content()
    _wait(browser, lambda d: d.current_url.rstrip("/").endswith("/dags/defender_device_sync"), "the DAG page")
    try:
        dialog = _wait(browser, lambda d: [e for e in d.find_elements(By.CSS_SELECTOR, "[role=dialog]")
                                           if "Full resync" in e.text and "Sources" in e.text], "the trigger form")[0]
    finally:
        browser.save_screenshot(str(tmp_path / "trigger-form.png"))
        print("dialogs:", [" ".join(e.text.split())[:300] for e in browser.find_elements(By.CSS_SELECTOR, "[role=dialog]")])
    print(f"trigger form: {' '.join(dialog.text.split())[:300]}")
