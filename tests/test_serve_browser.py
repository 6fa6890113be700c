"""The web page of `privrec serve`, clicked through in a real headless Chromium (Debian's chromium and
chromium-driver; `make test` installs them): enter a token, see the history and the recommendations, delete
my data, watch the request reach done, download the certificate."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from serve_helpers import Server, copy_model, tokens, victim_of

from privrec.rundir import MANIFEST_FILE

CHROMIUM, DRIVER = shutil.which("chromium") or "/usr/bin/chromium", shutil.which("chromedriver")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]


@pytest.fixture
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e .[dev])")
    if DRIVER is None or shutil.which(CHROMIUM) is None:
        if os.environ.get("CI"):  # .ci/run goes through `make test`, which installs them: missing is a failure
            pytest.fail("CI without chromium / chromedriver: `make browser` did not install them")
        pytest.skip("chromium / chromedriver not installed (apt-get install chromium chromium-driver; "
                    "`make test` does it as root)")
    from selenium.webdriver.chrome.service import Service as DriverService

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=DriverService(executable_path=DRIVER))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def test_a_user_deletes_their_data_from_the_page(served_model, tmp_path, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    model = copy_model(served_model, tmp_path / "served")
    victim = victim_of(model)
    token = tokens(model, victim)[victim]
    server = Server(model, tmp_path, "--candidates", "10")
    try:
        wait = WebDriverWait(browser, 120)
        browser.get(server.url + "/")
        browser.find_element(By.ID, "token").send_keys(token)
        browser.find_element(By.ID, "signin").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#recs tr")) == 10)
        assert browser.find_element(By.ID, "who").text == f"User {victim}"
        assert len(browser.find_elements(By.CSS_SELECTOR, "#history tr")) > 0
        assert browser.find_element(By.ID, "error").text == ""
        assert "trained again without them" in browser.find_element(By.ID, "forget-how").text
        assert not browser.find_element(By.ID, "cannot-delete").is_displayed()

        browser.find_element(By.ID, "delete").click()
        wait.until(EC.alert_is_present()).accept()
        wait.until(lambda d: d.find_element(By.ID, "request-id").text != "")
        rid = browser.find_element(By.ID, "request-id").text
        wait.until(lambda d: d.find_element(By.ID, "status").text == "done")
        link = wait.until(EC.visibility_of_element_located((By.ID, "cert-link")))
        assert link.get_attribute("download") == f"certificate-{rid}.json"
        steps = [li.text.split(" at ")[0] for li in browser.find_elements(By.CSS_SELECTOR, "#events li")]
        assert steps == ["pending", "retrained", "installed", "done"]
        downloaded = browser.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            "fetch(arguments[0]).then(r => r.text()).then(done);", link.get_attribute("href"))
        cert = json.loads(downloaded)
        on_disk = json.loads((model / "certificates" / f"{rid}.json").read_text())
        assert cert["body_sha256"] == on_disk["body_sha256"] and cert["body"] == on_disk["body"]

        # signing in again: the user's data is gone, the page says so
        browser.refresh()
        browser.find_element(By.ID, "token").send_keys(token)
        browser.find_element(By.ID, "signin").click()
        wait.until(lambda d: "delete" in d.find_element(By.ID, "error").text)
    finally:
        server.stop()


def test_the_page_of_a_model_that_cannot_forget_offers_no_button_and_errors_show_where_one_acted(
        served_model, tmp_path, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    from privrec.cli import main

    cannot = copy_model(served_model, tmp_path / "cannot")
    manifest = json.loads((cannot / MANIFEST_FILE).read_text())
    manifest["forget"] = []  # as a model of a kind that cannot forget records it
    (cannot / MANIFEST_FILE).write_text(json.dumps(manifest))
    can = copy_model(served_model, tmp_path / "can")
    victim = victim_of(can)
    wait = WebDriverWait(browser, 120)

    def sign_in(server, token):
        browser.get(server.url + "/")
        browser.find_element(By.ID, "token").send_keys(token)
        browser.find_element(By.ID, "signin").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#recs tr")) > 0)

    server = Server(cannot, tmp_path, "--candidates", "10")
    try:  # no promise, no button
        sign_in(server, tokens(cannot, victim)[victim])
        assert "cannot delete your data" in browser.find_element(By.ID, "cannot-delete").text
        assert not browser.find_element(By.ID, "delete").is_displayed()
    finally:
        server.stop()

    token = tokens(can, victim)[victim]
    server = Server(can, tmp_path, "--candidates", "10")
    try:  # the token is revoked after signing in: the refusal is shown beside the button pressed
        sign_in(server, token)
        assert main(["token", "revoke", str(can), token.split("_")[1][:6]]) == 0
        browser.find_element(By.ID, "delete").click()
        wait.until(EC.alert_is_present()).accept()
        wait.until(lambda d: d.find_element(By.ID, "delete-error").text != "")
        assert "revoked" in browser.find_element(By.ID, "delete-error").text
        assert browser.find_element(By.ID, "error").text == ""
        assert browser.find_element(By.ID, "request").get_attribute("hidden") is not None
    finally:
        server.stop()
