"""`vigil report`: one model over one time range, as a self-contained HTML file (plotly.js
inlined, nothing fetched when it is opened) and a PNG per chart, for a post-mortem or the
review of a rollout.

The topics are read as the page reads them, without a consumer group: every partition of
vigil.rollout, vigil.alerts, vigil.signals and vigil.inference.events from its beginning
to its end (the end as eventbus.state finds it), keeping the records of the model whose
event time lies in the range. The charts are the page's: requests, errors and latency per
version, each drift statistic against its threshold with the detections marked, candidate
against stable, ECE per version and the reliability diagram, the alerts' changes and the
rollout's decisions with their reasons.
"""

from __future__ import annotations

import datetime as dt
import html
import json
import math
import re
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from eventbus import topics
from eventbus.consumer import decode
from eventbus.kafka import Kafka
from eventbus.security import NONE as NO_SECURITY
from eventbus.security import KafkaSecurity
from eventbus.state import read_to_end, stop_consumer
from protos import events_pb2

from .model import Caps, Model, figures, seconds

TOPICS = (topics.ROLLOUT, topics.ALERTS, topics.SIGNALS, topics.INFERENCE)
DRIFT = ("ks", "psi", "adwin", "chi2", "page_hinkley", "mann_kendall")
VS_STABLE = ("ks_vs_stable", "chi2_vs_stable")
MAX_POINTS = 300  # request points per version over the range: the bucket grows with the range


class ReportError(ValueError):
    """A bad option, named: str(e) starts with the option."""

    def __init__(self, option: str, message: str):
        super().__init__(f"{option}: {message}")
        self.option = option


_AGO = re.compile(r"^(\d+(?:\.\d+)?)\s*(s|m|h|d)$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_time(option: str, text: str, now: float) -> float:
    """ISO 8601 (a time without a zone is UTC), `now`, or a duration before now (90s, 30m,
    2h, 1d) -> seconds since the epoch."""
    text = text.strip()
    if text == "now":
        return now
    if m := _AGO.match(text):
        return now - float(m[1]) * _UNIT[m[2]]
    try:
        t = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ReportError(option, f"{text!r} is neither a time (ISO 8601, e.g. 2026-05-01T12:00:00Z) "
                                  "nor a duration before now (e.g. 30m, 2h, 1d)") from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.timezone.utc)
    return t.timestamp()


def iso(t: float | None) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC") if t else "—"


def model_of(m) -> str:
    return m.labels.get("model", "") if isinstance(m, events_pb2.Alert) else m.model


@dataclass
class Collected:
    """What the topics say about one model in [since, until]."""

    model: str
    since: float
    until: float
    state: Model
    samples: dict = field(default_factory=lambda: defaultdict(list))  # version -> request samples in range
    alert_changes: list = field(default_factory=list)
    models_seen: set = field(default_factory=set)
    records: int = 0            # read from the topics, all models and times
    kept: int = 0               # of the model, in the range
    undecodable: int = 0


def bucket_for(span: float) -> float:
    """Seconds per request point: 5 s, or more so a range has at most MAX_POINTS."""
    return max(5.0, math.ceil(span / MAX_POINTS / 5.0) * 5.0)


def keep(c: Collected, m, record_time: float) -> None:
    c.records += 1
    name = model_of(m)
    if name:
        c.models_seen.add(name)
    if name != c.model:
        return
    t = seconds(m.time) or record_time
    if not (c.since <= t <= c.until):
        return
    c.kept += 1
    change = c.state.apply(m, record_time)
    if isinstance(m, events_pb2.InferenceEvent):
        c.samples[m.version].append((t, m.status == events_pb2.STATUS_OK, m.total_seconds, m.first_token_seconds,
                                     m.completion_tokens))
    elif change is not None and change["type"] == "alert":
        c.alert_changes.append(change["alert"])


async def collect(bootstrap_servers: str, model: str, since: float, until: float,
                  security: KafkaSecurity = NO_SECURITY, timeout: float = 120.0) -> Collected:
    """Read the topics whole and keep `model`'s records of [since, until]; ReportError
    naming --model if no record names the model (the message lists those that do)."""
    if not since < until:
        raise ReportError("--since", f"{iso(since)} is not before --until {iso(until)}")
    big = 10 ** 7  # the range is read once: nothing forgotten within it
    caps = Caps(readings=big, series=big, decisions=big, models=big, alerts=big, alert_changes=big, versions=big,
                recent_events=1, bucket_s=bucket_for(until - since), buckets=big)
    c = Collected(model, since, until, Model(caps))
    kafka = Kafka(bootstrap_servers, security)
    consumer = kafka.consumer("vigil-report", auto_offset_reset="earliest")
    await consumer.start()
    try:
        present = await consumer.topics()
        tps = []
        for topic in TOPICS:
            if topic in present:
                tps += await kafka.partitions(consumer, topic, 10.0)
        consumer.assign(tps)
        if tps:
            await consumer.seek_to_beginning(*tps)

        def on_record(r) -> None:
            received = decode(r)
            if received.message is None:
                c.undecodable += 1
            else:
                keep(c, received.message, r.timestamp / 1000)

        await read_to_end(consumer, tps, on_record, timeout)
    finally:
        await stop_consumer(consumer)
    if model not in c.models_seen:
        known = ", ".join(sorted(c.models_seen)) or "none"
        raise ReportError("--model", f"no record of model {model!r} on {bootstrap_servers}; models on the topics: "
                                     f"{known}")
    return c


# ---- figures ---------------------------------------------------------------------------

def plain(s) -> str:
    """plotly reads titles and names as a small HTML subset: entities make them text."""
    return html.escape(str(s), quote=False)


def when(t: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc)


def series_name(s: dict) -> str:
    return f"{s['model']}/{s['version']} {s['detector']} {s['feature']}" + "".join(
        f" {k}={v}" for k, v in sorted(s["labels"].items()))


@dataclass
class Chart:
    id: str       # file name of its PNG, without .png
    section: str
    title: str
    figure: object


def layout(title: str, **extra) -> dict:
    return {"title": {"text": plain(title), "font": {"size": 13}}, "height": 320, "width": 900,
            "margin": {"l": 55, "r": 15, "t": 60, "b": 40},
            "legend": {"orientation": "h", "x": 1, "xanchor": "right", "y": 1.0, "yanchor": "bottom"},
            "template": "plotly_white", **extra}


def charts(c: Collected) -> list[Chart]:
    import plotly.graph_objects as go

    out: list[Chart] = []
    snap = c.state.snapshot(c.until)
    traffic = sorted((t for t in snap["traffic"]), key=lambda t: t["version"])
    if traffic:
        for key, what, unit in (("rate", "requests per second", "requests/s"), ("error_rate", "error rate", ""),
                                ("p95", "latency p95", "s"), ("ttft_p50", "time to first token p50", "s"),
                                ("tokens_per_s", "tokens per second", "tokens/s")):
            fig = go.Figure([go.Scatter(x=[when(p["t"]) for p in t["points"]], y=[p[key] for p in t["points"]],
                                        name=plain(t["version"]), mode="lines+markers") for t in traffic])
            title = f"{c.model}: {what} per version"
            fig.update_layout(**layout(title, yaxis={"title": {"text": unit}}))
            out.append(Chart(f"requests-{key}", "requests", title, fig))

    signals = sorted(snap["signals"], key=lambda s: (s["detector"], s["feature"], s["version"], s["id"]))
    n = 0
    for s in signals:
        if s["detector"] not in DRIFT + VS_STABLE:
            continue
        r = s["readings"]
        hits = [p for p in r if p[3]]
        x = [when(p[0]) for p in r]
        fig = go.Figure([
            go.Scatter(x=x, y=[p[1] for p in r], name="statistic", mode="lines"),
            go.Scatter(x=x, y=[p[2] for p in r], name="threshold", mode="lines", line={"dash": "dash"}),
            go.Scatter(x=[when(p[0]) for p in hits], y=[p[1] for p in hits], name="drifted", mode="markers",
                       marker={"color": "#c62828", "size": 9, "symbol": "x"})])
        title = f"{series_name(s)}: {len(hits)} of {len(r)} readings drifted"
        fig.update_layout(**layout(title))
        n += 1
        out.append(Chart(f"drift-{n:03d}", "candidate" if s["detector"] in VS_STABLE else "drift", title, fig))

    eces = sorted((s for s in signals if s["detector"] == "ece"), key=lambda s: s["version"])
    if eces:
        fig = go.Figure([go.Scatter(x=[when(p[0]) for p in s["readings"]], y=[p[1] for p in s["readings"]],
                                    name=plain(s["version"]), mode="lines+markers") for s in eces])
        title = f"{c.model}: ECE per version"
        fig.update_layout(**layout(title))
        out.append(Chart("calibration-ece", "calibration", title, fig))
        for i, s in enumerate(eces, 1):
            bins = s["latest"].get("reliability") or []
            fig = go.Figure([
                go.Scatter(x=[0, 1], y=[0, 1], name="perfect", mode="lines", line={"dash": "dot", "color": "#999"}),
                go.Scatter(x=[b["confidence"] for b in bins], y=[b["accuracy"] for b in bins], name="bins",
                           mode="lines+markers", text=[f"{b['count']} predictions" for b in bins])])
            title = (f"{s['model']}/{s['version']}: reliability at {iso(s['latest']['time'])}, "
                     f"ECE {fmt(s['latest']['statistic'])}")
            fig.update_layout(**layout(title, xaxis={"range": [0, 1], "title": {"text": "confidence"}},
                                       yaxis={"range": [0, 1], "title": {"text": "accuracy"}}))
            out.append(Chart(f"calibration-reliability-{i:02d}", "calibration", title, fig))
    return out


def fmt(x, digits: int = 3) -> str:
    if x is None:
        return "—"
    return f"{x:.{digits}g}" if isinstance(x, float) else str(x)


def summary(c: Collected) -> list[dict]:
    """Request figures per version over the whole range."""
    span = c.until - c.since
    return [{"version": v, **figures(s, span)} for v, s in sorted(c.samples.items())]


# ---- the file ----------------------------------------------------------------------------

STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em auto; max-width: 960px; color: #222; }
h1 { font-size: 1.5em; } h2 { margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: .5em 0; font-size: 13px; }
th, td { border: 1px solid #ddd; padding: 3px 6px; text-align: left; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.note { color: #666; } figure { margin: 1em 0; } .state-firing { color: #c62828; font-weight: bold; }
"""


def table(head: list[str], rows: list[list], numeric: set[int] = frozenset()) -> str:
    def cell(i, v):
        return f'<td class="num">{html.escape(fmt(v))}</td>' if i in numeric else f"<td>{html.escape(fmt(v))}</td>"
    return ("<table><thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr></thead><tbody>"
            + "".join("<tr>" + "".join(cell(i, v) for i, v in enumerate(r)) + "</tr>" for r in rows)
            + "</tbody></table>")


def pairs(d: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(d.items()))


def render(c: Collected, chart_list: list[Chart], generated: float) -> str:
    import plotly.io as pio
    from plotly.offline import get_plotlyjs

    e = html.escape
    s = summary(c)
    parts = [f"<h1>Vigil report: {e(c.model)}</h1>",
             f'<p class="note">from {e(iso(c.since))} to {e(iso(c.until))}; written {e(iso(generated))}; '
             f"{c.kept} records of the model in the range, of {c.records} read from {', '.join(TOPICS)}"
             + (f"; {c.undecodable} undecodable" if c.undecodable else "") + "</p>"]
    parts.append('<h2 id="requests">Requests per version</h2>')
    parts.append(table(["version", "requests", "requests/s", "errors", "error rate", "p50 s", "p95 s", "p99 s",
                        "first token p50 s", "tokens/s"],
                       [[x["version"], x["requests"], x["rate"], x["errors"], x["error_rate"], x["p50"], x["p95"],
                         x["p99"], x["ttft_p50"], x["tokens_per_s"]] for x in s], set(range(1, 10)))
                 if s else "<p>no requests in the range</p>")
    figures_of = defaultdict(list)
    for ch in chart_list:
        figures_of[ch.section].append(ch)
    first = True

    def figs(section: str, empty: str) -> None:
        nonlocal first
        if not figures_of[section]:
            parts.append(f"<p>{e(empty)}</p>")
        for ch in figures_of[section]:
            div = pio.to_html(ch.figure, full_html=False, include_plotlyjs=False, div_id=f"chart-{ch.id}",
                              config={"displayModeBar": False})
            parts.append(f'<figure id="{e(ch.id)}"><figcaption>{e(ch.title)}</figcaption>{div}</figure>')
            first = False

    figs("requests", "")
    parts.append('<h2 id="drift">Drift</h2>')
    figs("drift", "no drift readings in the range")
    parts.append('<h2 id="candidate">Candidate against stable</h2>')
    figs("candidate", "no comparison of a candidate with its stable version in the range")
    parts.append('<h2 id="calibration">Calibration</h2>')
    figs("calibration", "no calibration readings in the range (they need Feedback with labels)")

    parts.append('<h2 id="alerts">Alerts</h2>')
    parts.append(table(["time", "state", "from", "rule", "severity", "labels", "annotations", "value"],
                       [[iso(a["time"]), a["state"], a["previous_state"], a["rule"], a["severity"], pairs(a["labels"]),
                         pairs(a["annotations"]), a["value"]] for a in c.alert_changes], {7})
                 if c.alert_changes else "<p>no alert changed state in the range</p>")
    decisions = (c.state.snapshot(c.until)["models"].get(c.model) or {}).get("history", [])
    parts.append('<h2 id="rollout">Rollout decisions</h2>')
    parts.append(table(["time", "generation", "phase", "strategy", "step", "stable", "candidate", "weights", "reason"],
                       [[iso(d["time"]), d["generation"], d["phase"], d["strategy"], d["step"], d["stable_version"],
                         d["candidate_version"], ", ".join(f"{v}: {fmt(w)}" for v, w in d["weights"].items()),
                         d["reason"]] for d in decisions], {1, 4})
                 if decisions else "<p>no rollout decision in the range</p>")
    data = {"model": c.model, "since": c.since, "until": c.until, "requests": s,
            "decisions": len(decisions), "alert_changes": len(c.alert_changes)}
    data_json = json.dumps(data, allow_nan=False, default=str).replace("<", "\\u003c")
    return ("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>Vigil report: {e(c.model)}</title><style>{STYLE}</style>"
            f"<script>{get_plotlyjs()}</script></head><body>\n" + "\n".join(parts)
            + f'\n<script type="application/json" id="report-data">{data_json}</script>\n</body></html>\n')


def write_pngs(chart_list: list[Chart], folder: Path) -> list[Path]:
    """One PNG per chart, drawn by kaleido in one headless Chromium (the system's, found
    on PATH; nothing is downloaded: plotly.js from the plotly package, MathJax off)."""
    import kaleido

    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{ch.id}.png" for ch in chart_list]
    if chart_list:
        try:
            kaleido.write_fig_from_object_sync(
                [{"fig": ch.figure, "path": str(p), "opts": {"format": "png"}} for ch, p in zip(chart_list, paths)],
                kopts={"mathjax": False},  # its default is a CDN: no network here
                cancel_on_error=True)
        except Exception as e:
            if "chrom" in str(e).lower():
                raise ReportError("--png-dir", f"PNG figures need Chromium (apt-get install chromium), which was not "
                                               f"usable: {e}; --no-png writes the HTML file alone") from None
            raise
    return paths


@dataclass
class Written:
    html: Path
    pngs: list[Path]
    collected: Collected


async def report(bootstrap_servers: str, model: str, since: float, until: float, out: Path,
                 png_dir: Path | None, security: KafkaSecurity = NO_SECURITY) -> Written:
    c = await collect(bootstrap_servers, model, since, until, security)
    chart_list = charts(c)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(c, chart_list, time.time()), encoding="utf-8")
    pngs = write_pngs(chart_list, png_dir) if png_dir is not None else []
    return Written(out, pngs, c)
