"""The page in a real headless Chromium (Debian's, driven by its chromedriver through
selenium) against a `vigil ui` process on the embedded broker: records published while
the page is open show up without a reload (a drifted signal marked as drifted, a firing
alert whose `<script>` label shows as text and runs nothing, the rollout's reason, the
request figures), and the alert's link leads to its signals. A screenshot is kept."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid

import pytest
from selenium.webdriver.common.by import By

from protos import events_pb2
from tests.helpers import ROOT
from tests.helpers.browser import texts, wait
from tests.helpers.messages import alert, drift, ece, ensure_topics, produce, request, rollout
SCRIPT = "<script>window.injected = 1</script>"


@pytest.fixture
def ui(kafka_broker):
    proc = subprocess.Popen([sys.executable, "-m", "vigil.cli", "ui", "--bootstrap-servers",
                             kafka_broker.bootstrap_servers, "--port", "0"], cwd=ROOT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    line = proc.stdout.readline()
    assert line.startswith("vigil ui: http://"), line
    yield line.split()[2]
    proc.terminate()
    proc.wait(timeout=30)


def test_the_page_shows_drift_alerts_and_decisions_live(kafka_broker, ui, browser, tmp_path):
    bootstrap = kafka_broker.bootstrap_servers
    asyncio.run(ensure_topics(bootstrap))
    model = f"page-{uuid.uuid4().hex[:6]}"
    browser.get(ui)
    wait(browser, lambda d: d.find_element(By.ID, "connection").text == "live", "the stream connected")

    now = time.time()
    readings = [drift(model, "2", statistic=0.05 + 0.01 * i, drifted=False, t=now - 10 + i) for i in range(6)]
    began = time.monotonic()
    asyncio.run(produce(
        bootstrap, rollout(model, 1, events_pb2.ROLLOUT_PHASE_STABLE, {"1": 1.0}, "version 1 loaded"),
        rollout(model, 2, events_pb2.ROLLOUT_PHASE_CANARY, {"1": 0.75, "2": 0.25}, "canary: step 1, 25 percent", step=1),
        *readings, drift(model, "2", statistic=0.41, t=now),
        alert(model, "2", events_pb2.ALERT_STATE_FIRING, label=SCRIPT),
        *[request(model, "2", total=0.2, t=now) for _ in range(12)],
        ece(model, "2", 0.15), drift(model, "2", detector="ks_vs_stable", feature="mean_entropy", statistic=0.5)))

    chart = wait(browser, lambda d: [t for t in texts(d, "#drift-charts figure[data-drifted='true']")
                                     if f"{model}/2 ks mean_logprob" in t], "the drifted signal")[0]
    assert "0.410 vs 0.200" in chart and "drifted" in chart and "1 detections" in chart
    row = wait(browser, lambda d: [t for t in texts(d, "tr.alert[data-state='firing']") if f"model={model}" in t],
               "the firing alert")[0]
    shown = time.monotonic() - began
    assert f"team={SCRIPT}" in row and "<b>bold</b>" in row
    assert browser.execute_script("return window.injected") is None
    assert not browser.find_elements(By.CSS_SELECTOR, "#alert-list script, #alert-list b b")
    wait(browser, lambda d: "canary: step 1, 25 percent" in d.find_element(By.ID, "models").text, "the decision")
    assert "25.0 %" in browser.find_element(By.ID, "models").text
    wait(browser, lambda d: any(r.startswith(f"{model} 2 ") and " 12 0 " in r for r in texts(d, "#traffic tr.version")),
         "the request figures")

    wait(browser, lambda d: any(f"{model}/2: reliability" in t and "ECE 0.150" in t
                                for t in texts(d, "#calibration-charts figure")), "the reliability diagram")
    wait(browser, lambda d: any(f"{model}/2 ks_vs_stable mean_entropy" in t and "drifted" in t
                                for t in texts(d, "#candidate-charts figure")), "the candidate against stable")

    def follow_link(d):
        for r in d.find_elements(By.CSS_SELECTOR, "tr.alert[data-state='firing']"):
            if f"model={model}" in r.text:
                r.find_element(By.CSS_SELECTOR, "a.signals-link").click()
                return True
    wait(browser, follow_link, "the alert's link")
    wait(browser, lambda d: any(f"{model}/2 ks mean_logprob" in t for t in texts(d, "#selected figure")),
         "the alert's signals")
    assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []
    browser.execute_script("window.scrollTo(0, 0)")
    shot = tmp_path / "vigil-page.png"
    assert browser.save_screenshot(str(shot))
    print(f"\nscreenshot: {shot} (alert shown {shown:.2f} s after publishing began)")
