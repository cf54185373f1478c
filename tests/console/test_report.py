"""`vigil report` on the embedded broker: records of a model produced inside and outside a
time range (by event time), the command run as a user runs it, and the file it writes
read back: the request figures against the records, the drift readings and decisions of
the range only, labels escaped, plotly.js inlined and nothing fetched, a PNG per chart.
Bad options are refused by name. No browser."""

from __future__ import annotations

import asyncio
import datetime as dt
import html
import json
import os
import re
import subprocess
import sys
import time
import uuid

import pytest

from console.report import ReportError, parse_time
from protos import events_pb2
from tests.helpers import ROOT
from tests.helpers.messages import alert, drift, ece, ensure_topics, produce, request, rollout

SCRIPT = "<script>window.injected = 1</script>"


def iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).isoformat()


def vigil_report(bootstrap: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vigil.cli", "report", "--bootstrap-servers", bootstrap, *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=180,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_times_are_iso_or_before_now_and_bad_ones_name_the_option():
    now = 1_800_000_000.0
    assert parse_time("--since", "2h", now) == now - 7200
    assert parse_time("--since", "90s", now) == now - 90
    assert parse_time("--until", "now", now) == now
    assert parse_time("--since", "2027-01-15T08:00:00Z", now) == dt.datetime(2027, 1, 15, 8, tzinfo=dt.timezone.utc).timestamp()
    assert parse_time("--since", "2027-01-15T08:00:00", now) == parse_time("--since", "2027-01-15T08:00:00+00:00", now)
    with pytest.raises(ReportError, match="^--until: 'yesterday' is neither a time"):
        parse_time("--until", "yesterday", now)


def test_the_report_holds_the_range_of_the_model_and_nothing_else(kafka_broker, tmp_path):
    bootstrap = kafka_broker.bootstrap_servers
    asyncio.run(ensure_topics(bootstrap))
    model, other = f"report-{uuid.uuid4().hex[:6]}", f"other-{uuid.uuid4().hex[:6]}"
    t0 = time.time() - 3600  # the range: an hour ago, for a minute
    inside = [request(model, "2", total=0.1 * (i + 1), ok=i != 9, tokens=7, t=t0 + 5 + i) for i in range(10)]
    inside += [request(model, "1", total=0.05, t=t0 + 20 + i) for i in range(4)]
    before = [request(model, "2", total=9.0, ok=False, t=t0 - 120) for _ in range(5)]
    asyncio.run(produce(
        bootstrap, *before, *inside, request(other, "1", total=0.3, t=t0 + 10),
        rollout(model, 1, events_pb2.ROLLOUT_PHASE_STABLE, {"1": 1.0}, "old decision"),  # its time: now, outside
        *[drift(model, "2", statistic=0.05 + 0.01 * i, drifted=False, t=t0 + 10 + i) for i in range(5)],
        drift(model, "2", statistic=0.43, t=t0 + 30), drift(model, "2", statistic=0.97, t=t0 - 60),
        drift(model, "2", detector="ks_vs_stable", feature="mean_entropy", statistic=0.5, t=t0 + 31),
        stamp_at(ece(model, "2", 0.15), t0 + 32), stamp_at(alert(model, "2", events_pb2.ALERT_STATE_FIRING, label=SCRIPT), t0 + 33),
        stamp_at(rollout(model, 7, events_pb2.ROLLOUT_PHASE_ROLLED_BACK, {"1": 1.0},
                         "rolled back: ks drift of mean_logprob on 2"), t0 + 40)))

    out = tmp_path / "r.html"
    r = vigil_report(bootstrap, "--model", model, "--since", iso(t0), "--until", iso(t0 + 60), "--out", str(out),
                     "--png-dir", str(tmp_path / "png"))
    assert r.returncode == 0, r.stderr
    assert f"vigil report: {out} (" in r.stdout
    page = out.read_text()

    data = json.loads(re.search(r'<script type="application/json" id="report-data">(.*?)</script>', page, re.S)[1])
    by_version = {v["version"]: v for v in data["requests"]}
    v2 = by_version["2"]  # the 10 inside, not the 5 before
    assert (v2["requests"], v2["errors"]) == (10, 1)
    assert v2["p50"] == pytest.approx(0.5) and v2["p99"] == pytest.approx(0.9)  # of the 9 that succeeded
    assert v2["tokens_per_s"] == pytest.approx(9 * 7 / 60) and v2["rate"] == pytest.approx(10 / 60)
    assert by_version["1"]["requests"] == 4
    assert data["decisions"] == 1 and data["alert_changes"] == 1

    # the tables, as text
    assert "rolled back: ks drift of mean_logprob on 2" in page and "old decision" not in page
    assert html.escape(f"team={SCRIPT}") in page and SCRIPT not in page
    assert "<td>firing</td>" in page
    # the charts: plotly.js inlined once, no script from elsewhere, the readings of the range only
    assert page.count("plotly.js v") >= 1 and not re.search(r'<script[^>]+src=', page)
    bundle = re.search(r"<script>(/\*\*? *\n? *\* *plotly\.js v.*?)</script>", page, re.S)
    rest = page.replace(bundle[0], "")
    assert bundle and "://" not in rest  # nothing outside the bundle names a URL
    captions = re.findall(r"<figcaption>(.*?)</figcaption>", rest)
    assert f"{model}/2 ks mean_logprob route=stable: 1 of 6 readings drifted" in captions
    assert "0.43" in rest and "0.97" not in rest  # the reading before the range is left out
    assert any(f"{model}/2 ks_vs_stable mean_entropy" in c for c in captions)
    assert any("ECE 0.15" in c for c in captions)

    pngs = sorted(p.name for p in (tmp_path / "png").iterdir())
    assert "requests-rate.png" in pngs and "calibration-ece.png" in pngs and "drift-001.png" in pngs
    assert all((tmp_path / "png" / n).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for n in pngs)
    assert f"{len(pngs)} PNG figures" in r.stdout

    r = vigil_report(bootstrap, "--model", "nobody", "--out", str(tmp_path / "x.html"), "--no-png")
    assert r.returncode == 2
    assert r.stderr.startswith("vigil report: --model: no record of model 'nobody'") and model in r.stderr
    r = vigil_report(bootstrap, "--model", model, "--since", "1h", "--until", "2h", "--no-png")
    assert r.returncode == 2 and r.stderr.startswith("vigil report: --since: ") and "is not before --until" in r.stderr
    r = vigil_report(bootstrap, "--model", model, "--since", "last tuesday", "--no-png")
    assert r.returncode == 2 and "--since: 'last tuesday' is neither a time" in r.stderr
    assert not (tmp_path / "x.html").exists()


def stamp_at(m, t: float):
    m.time.FromNanoseconds(int(t * 1e9))
    return m
