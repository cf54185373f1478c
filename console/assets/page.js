// Vigil's page: the state from /api/events (first the whole state, then each change),
// drawn with plotly.js. Everything shown is set as text (textContent, or entities in
// plotly's labels): labels and annotations come from users.
"use strict";

const READINGS = 360;          // readings kept per series, as the server does
const POINTS = 720;            // request figure points per version
const HISTORY = 200;           // decisions per model
const DRIFT = new Set(["ks", "psi", "adwin", "chi2", "page_hinkley", "mann_kendall"]);
const VS_STABLE = new Set(["ks_vs_stable", "chi2_vs_stable"]);
const STATE_ORDER = {firing: 0, pending: 1, silenced: 2, resolved: 3, inactive: 4};
const ACTIONS = [["pause", "pause"], ["resume", "resume"], ["promote", "promote"], ["rollback", "roll back"], ["undo", "undo"]];
const KEY = "vigil.admin-key";   // sessionStorage: the admin key, for this tab only

let state = null;
const series = new Map();      // id -> series with readings
const revisions = new Map();   // id -> count of changes, so a chart is redrawn only when its data moved
let timer = null;

function el(tag, props, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (k === "class") e.className = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v);
  }
  for (const c of children) if (c !== null && c !== undefined) e.append(c instanceof Node ? c : String(c));
  return e;
}

// plotly reads its labels as a small HTML subset: entities make them plain text
const plain = (s) => String(s).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");
const num = (x, digits = 3) => (x === null || x === undefined) ? "—" : Number(x).toPrecision(digits);
const clock = (t) => t ? new Date(t * 1000).toLocaleTimeString() : "—";
const date = (t) => new Date(t * 1000);
const name = (s) => `${s.model}/${s.version} ${s.detector} ${s.feature}` +
  Object.entries(s.labels).map(([k, v]) => ` ${k}=${v}`).join("");

function bump(id) { revisions.set(id, (revisions.get(id) || 0) + 1); }

function load(s) {
  state = s;
  series.clear();
  for (const x of s.signals) { series.set(x.id, x); bump(x.id); }
  bump("traffic"); bump("calibration");
  schedule();
}

function onSignal(d) {
  let s = series.get(d.series.id);
  if (!s) { s = {...d.series, readings: []}; series.set(s.id, s); }
  s.latest = d.series.latest;
  s.readings.push(d.reading);
  if (s.readings.length > READINGS) s.readings.shift();
  bump(s.id);
  if (s.detector === "ece") bump("calibration");
  schedule();
}

function onAlert(d) {
  const i = state.alerts.findIndex((a) => a.fingerprint === d.alert.fingerprint);
  if (i >= 0) state.alerts[i] = d.alert; else state.alerts.push(d.alert);
  schedule();
}

function onRollout(d) {
  const m = state.models[d.decision.model] || (state.models[d.decision.model] = {history: []});
  const h = m.history;
  if (h.length && d.decision.generation && h[h.length - 1].generation === d.decision.generation) h[h.length - 1] = d.decision;
  else h.push(d.decision);
  if (h.length > HISTORY) h.shift();
  m.latest = d.decision;
  schedule();
}

function onTraffic(d) {
  for (const v of d.versions) {
    const old = state.traffic.find((t) => t.model === v.model && t.version === v.version);
    if (!old) { state.traffic.push(v); continue; }
    old.current = v.current;
    const from = v.points.length ? v.points[0].t : Infinity;
    old.points = old.points.filter((p) => p.t < from).concat(v.points).slice(-POINTS);
  }
  bump("traffic");
  schedule();
}

function schedule() {
  if (timer === null) timer = setTimeout(() => { timer = null; render(); }, 300);
}

function render() {
  renderKey();
  renderModels();
  renderTraffic();
  renderDrift();
  renderCandidate();
  renderCalibration();
  renderAlerts();
  renderSelected();
}

function table(head, rows) {
  return el("table", {}, el("thead", {}, el("tr", {}, ...head.map((h) => el("th", {}, h)))),
            el("tbody", {}, ...rows));
}

function renderModels() {
  const out = [];
  for (const [model, m] of Object.entries(state.models).sort(([a], [b]) => a.localeCompare(b))) {
    const d = m.latest;
    const versions = new Set([...Object.keys(d.weights), d.stable_version, d.candidate_version, ...d.shadow_versions]);
    versions.delete("");
    const role = (v) => v === d.stable_version ? "stable" : v === d.candidate_version ? "candidate"
      : d.shadow_versions.includes(v) ? "shadow" : "";
    out.push(el("div", {class: "model"},
      el("h3", {}, model),
      el("p", {class: "phase"}, el("span", {class: `badge phase-${d.phase}`}, d.phase),
         ` ${d.strategy || ""} step ${d.step} · generation ${d.generation}`,
         d.attention ? el("span", {class: "badge attention"}, "needs attention") : null),
      el("p", {class: "reason"}, d.reason),
      actionsOf(model),
      table(["version", "role", "weight"], [...versions].sort().map((v) =>
        el("tr", {}, el("td", {}, v), el("td", {}, role(v)),
           el("td", {}, d.weights[v] !== undefined ? `${(d.weights[v] * 100).toFixed(1)} %` : "—")))),
      el("details", {}, el("summary", {}, `decisions (${m.history.length})`),
        table(["time", "gen", "phase", "step", "weights", "reason", "figures"], m.history.slice().reverse().map((h) =>
          el("tr", {}, el("td", {}, clock(h.time)), el("td", {}, h.generation), el("td", {}, h.phase),
             el("td", {}, h.step), el("td", {}, Object.entries(h.weights).map(([v, w]) => `${v}: ${num(w, 2)}`).join(", ")),
             el("td", {class: "reason"}, h.reason),
             el("td", {}, h.figures ? el("details", {}, el("summary", {}, "figures"),
                                           el("pre", {}, JSON.stringify(h.figures, null, 1))) : "")))))));
  }
  document.getElementById("models").replaceChildren(...(out.length ? out : [el("p", {}, "no rollout state yet")]));
}

const results = new Map();   // model -> the latest action's outcome, shown under its buttons

function actionsOf(model) {
  const a = state.actions || {};
  if (!a.enabled) return el("p", {class: "note"}, "actions are off: the page was started without --rollout-url");
  return el("div", {class: "actions", "data-model": model},
    ...ACTIONS.map(([action, label]) => el("button", {type: "button", "data-action": action,
      onclick: () => act(model, action, label)}, label)),
    el("span", {class: "action-result"}, results.get(model) || ""));
}

async function act(model, action, label) {
  const headers = {"Content-Type": "application/json"};
  const key = sessionStorage.getItem(KEY) || "";
  if (state.actions.key_required) {
    if (!key) { results.set(model, `${label}: enter the admin key above first`); renderModels(); return; }
    headers.Authorization = `Bearer ${key}`;
  }
  results.set(model, `${label}: sent`);
  renderModels();
  let text;
  try {
    const r = await fetch(`/api/actions/${action}`, {method: "POST", headers, body: JSON.stringify({model}),
                                                    credentials: "same-origin"});
    const answer = await r.json();
    text = r.ok ? `${label}: done` + (answer.result && answer.result.reason ? ` (${answer.result.reason})` : "")
      : `${label} refused: ${answer.error}`;
  } catch (e) {
    text = `${label} failed: ${e}`;
  }
  results.set(model, text);
  renderModels();
}

function renderKey() {
  const box = document.getElementById("key-box");
  const needed = state.actions && state.actions.enabled && state.actions.key_required;
  box.hidden = !needed;
}

function renderTraffic() {
  const rows = state.traffic.slice().sort((a, b) => (a.model + a.version).localeCompare(b.model + b.version)).map((t) => {
    const c = t.current;
    return el("tr", {class: "version"}, el("td", {}, t.model), el("td", {}, t.version), el("td", {}, num(c.rate)),
      el("td", {}, c.requests), el("td", {}, c.errors), el("td", {}, c.error_rate === null ? "—" : `${(c.error_rate * 100).toFixed(1)} %`),
      el("td", {}, num(c.p50)), el("td", {}, num(c.p95)), el("td", {}, num(c.p99)), el("td", {}, num(c.ttft_p50)),
      el("td", {}, num(c.tokens_per_s)));
  });
  document.getElementById("traffic").replaceChildren(rows.length ? table(
    ["model", "version", "requests/s", "requests", "errors", "error rate", "p50 s", "p95 s", "p99 s", "first token p50 s",
     "tokens/s"], rows) : el("p", {}, "no requests yet"), el("p", {class: "note"}, "over the last minute"));
  const models = [...new Set(state.traffic.map((t) => t.model))].sort();
  const charts = [];
  for (const model of models) {
    const mine = state.traffic.filter((t) => t.model === model);
    const line = (key) => mine.map((t) => ({x: t.points.map((p) => date(p.t)), y: t.points.map((p) => p[key]),
                                          name: plain(t.version), mode: "lines+markers", type: "scatter"}));
    charts.push({id: `traffic:${model}:rate`, title: `${model}: requests/s`, rev: "traffic", traces: () => line("rate")});
    charts.push({id: `traffic:${model}:p95`, title: `${model}: p95 latency, s`, rev: "traffic", traces: () => line("p95")});
  }
  draw("traffic-charts", charts);
}

function signalChart(s, prefix) {
  const drifted = s.latest && s.latest.drifted;
  return {
    id: `${prefix}:${s.id}`, rev: s.id, drifted,
    title: `${name(s)}: ${num(s.latest.statistic)}` + (s.latest.threshold !== null ? ` vs ${num(s.latest.threshold)}` : "") +
      (drifted ? " · drifted" : "") + ` · ${s.latest.detections} detections`,
    traces: () => {
      const r = s.readings;
      const x = r.map((p) => date(p[0]));
      const hits = r.filter((p) => p[3]);
      return [
        {x, y: r.map((p) => p[1]), name: "statistic", mode: "lines", type: "scatter"},
        {x, y: r.map((p) => p[2]), name: "threshold", mode: "lines", type: "scatter", line: {dash: "dash"}},
        {x: hits.map((p) => date(p[0])), y: hits.map((p) => p[1]), name: "drifted", mode: "markers", type: "scatter",
         marker: {color: "#c62828", size: 9, symbol: "x"}},
      ];
    },
  };
}

function renderDrift() {
  const select = document.getElementById("detector");
  const detectors = [...new Set([...series.values()].filter((s) => DRIFT.has(s.detector)).map((s) => s.detector))].sort();
  if (select.options.length !== detectors.length || [...select.options].some((o, i) => o.value !== detectors[i])) {
    const chosen = select.value || "ks";
    select.replaceChildren(...detectors.map((d) => el("option", {value: d}, d)));
    select.value = detectors.includes(chosen) ? chosen : (detectors[0] || "");
  }
  const shown = [...series.values()].filter((s) => s.detector === select.value).sort((a, b) => a.id.localeCompare(b.id));
  draw("drift-charts", shown.map((s) => signalChart(s, "drift")));
}

function renderCandidate() {
  const shown = [...series.values()].filter((s) => VS_STABLE.has(s.detector)).sort((a, b) => a.id.localeCompare(b.id));
  draw("candidate-charts", shown.map((s) => signalChart(s, "candidate")),
       "no candidate compared with its stable version yet");
}

function renderCalibration() {
  const eces = [...series.values()].filter((s) => s.detector === "ece");
  const charts = [];
  for (const model of [...new Set(eces.map((s) => s.model))].sort()) {
    const mine = eces.filter((s) => s.model === model).sort((a, b) => a.version.localeCompare(b.version));
    charts.push({id: `ece:${model}`, title: `${model}: ECE per version`, rev: "calibration", traces: () => mine.map((s) => ({
      x: s.readings.map((p) => date(p[0])), y: s.readings.map((p) => p[1]), name: plain(s.version),
      mode: "lines+markers", type: "scatter"}))});
    for (const s of mine) {
      const bins = (s.latest && s.latest.reliability) || [];
      charts.push({id: `reliability:${s.id}`, rev: s.id, layout: {xaxis: {range: [0, 1], title: {text: "confidence"}},
                                                                  yaxis: {range: [0, 1], title: {text: "accuracy"}}},
        title: `${s.model}/${s.version}: reliability at ${clock(s.latest.time)}, ECE ${num(s.latest.statistic)}`,
        traces: () => [
          {x: [0, 1], y: [0, 1], name: "perfect", mode: "lines", type: "scatter", line: {dash: "dot", color: "#999"}},
          {x: bins.map((b) => b.confidence), y: bins.map((b) => b.accuracy), text: bins.map((b) => `${b.count} predictions`),
           name: "bins", mode: "lines+markers", type: "scatter", marker: {size: bins.map((b) => 6 + Math.min(14, Math.sqrt(b.count)))}},
        ]});
    }
  }
  draw("calibration-charts", charts, "no calibration readings yet (they need Feedback with labels)");
}

function signalsLink(labels) {
  const q = new URLSearchParams();
  for (const k of ["model", "version", "detector", "feature"]) if (labels[k]) q.set(k, labels[k]);
  return "#signals?" + q.toString();
}

// silenced: muted by a silence (alerting's API) while pending or firing
const shownState = (a) => (a.silenced_by || []).length && (a.state === "firing" || a.state === "pending") ? "silenced" : a.state;

function renderAlerts() {
  const alerts = state.alerts.slice().sort((a, b) =>
    (STATE_ORDER[shownState(a)] ?? 9) - (STATE_ORDER[shownState(b)] ?? 9) || b.time - a.time);
  const rows = alerts.map((a) => el("tr", {class: "alert", "data-state": shownState(a), "data-fingerprint": a.fingerprint},
    el("td", {}, el("span", {class: `badge state-${shownState(a)}`}, shownState(a)),
       shownState(a) === "silenced" ? el("div", {class: "note"}, `${a.state}, silenced by ${a.silenced_by.join(", ")}`) : null),
    el("td", {}, a.rule), el("td", {}, a.severity),
    el("td", {class: "labels"}, ...Object.entries(a.labels).sort().map(([k, v]) => el("span", {class: "label"}, `${k}=${v}`))),
    el("td", {class: "annotations"}, ...Object.entries(a.annotations).sort().map(([k, v]) =>
      el("div", {}, el("b", {}, `${k}: `), v))),
    el("td", {}, clock(a.starts_at)), el("td", {}, a.ends_at ? clock(a.ends_at) : ""), el("td", {}, num(a.value)),
    el("td", {}, a.labels.model ? el("a", {href: signalsLink(a.labels), class: "signals-link"}, "signals") : "")));
  document.getElementById("alert-list").replaceChildren(rows.length ? table(
    ["state", "rule", "severity", "labels", "annotations", "since", "ended", "value", ""], rows) : el("p", {}, "no alerts"));
  const silences = (state.silences || []).filter((x) => x.state !== "expired");
  document.getElementById("silence-list").replaceChildren(...[
    state.silences_error ? el("p", {class: "note"}, state.silences_error) : null,
    !state.alerting_url ? el("p", {class: "note"}, "silences are not shown: the page was started without --alerting-url")
      : silences.length ? table(["id", "state", "matchers", "by", "comment", "until"], silences.map((x) =>
        el("tr", {class: "silence"}, el("td", {}, x.id), el("td", {}, x.state), el("td", {}, x.matchers.join(", ")),
           el("td", {}, x.created_by), el("td", {}, x.comment), el("td", {}, x.ends_at))))
      : el("p", {}, "no active silences")].filter((x) => x !== null));
}

function renderSelected() {
  const section = document.getElementById("signals-of");
  const hash = location.hash;
  if (!hash.startsWith("#signals?")) { section.hidden = true; return; }
  const want = Object.fromEntries(new URLSearchParams(hash.slice("#signals?".length)));
  section.hidden = false;
  document.getElementById("signals-filter").replaceChildren(
    Object.entries(want).map(([k, v]) => `${k}=${v}`).join(" "), " ",
    el("a", {href: "#alerts"}, "back to the alerts"));
  const shown = [...series.values()].filter((s) => Object.entries(want).every(([k, v]) => s[k] === v))
    .sort((a, b) => a.id.localeCompare(b.id));
  draw("selected", shown.map((s) => signalChart(s, "selected")), "no signal of that series has been read");
}

// charts: [{id, title, rev, traces(), layout?, drifted?}] into the container, each redrawn only when its revision moved
function draw(containerId, charts, empty) {
  const container = document.getElementById(containerId);
  const keep = new Set(charts.map((c) => c.id));
  for (const f of [...container.querySelectorAll("figure")]) if (!keep.has(f.dataset.id)) { Plotly.purge(f.lastChild); f.remove(); }
  for (const p of [...container.querySelectorAll("p.empty")]) p.remove();
  if (!charts.length && empty) container.append(el("p", {class: "empty"}, empty));
  for (const c of charts) {
    let f = [...container.children].find((x) => x.dataset.id === c.id);
    if (!f) {
      f = el("figure", {class: "chart"}, el("figcaption", {}), el("div", {class: "plot"}));
      f.dataset.id = c.id;
      container.append(f);
    }
    f.dataset.drifted = c.drifted ? "true" : "false";
    f.firstChild.textContent = c.title;
    const rev = `${revisions.get(c.rev) || 0}`;
    if (f.dataset.rev === rev) continue;
    f.dataset.rev = rev;
    Plotly.react(f.lastChild, c.traces(), {
      margin: {l: 45, r: 10, t: 10, b: 30}, height: 220, showlegend: true, legend: {orientation: "h"},
      ...(c.layout || {})}, {displayModeBar: false, responsive: true});
  }
}

function connect() {
  const status = document.getElementById("connection");
  const source = new EventSource("/api/events");
  const on = (event, f) => source.addEventListener(event, (e) => f(JSON.parse(e.data)));
  on("state", (s) => {
    status.textContent = "live";
    status.className = "connection live";
    document.getElementById("following").textContent = s.following.length
      ? `reading ${s.following.join(", ")}` : "waiting for the topics";
    load(s);
  });
  on("signal", onSignal);
  on("alert", onAlert);
  on("rollout", onRollout);
  on("traffic", onTraffic);
  on("silences", (d) => { state.silences = d.silences; state.silences_error = d.error; schedule(); });
  source.onerror = () => { status.textContent = "reconnecting"; status.className = "connection down"; };
}

document.getElementById("admin-key").addEventListener("change", (e) => {
  sessionStorage.setItem(KEY, e.target.value.trim());
  e.target.value = "";
  e.target.placeholder = "admin key set for this tab";
});
document.getElementById("detector").addEventListener("change", () => { if (state) renderDrift(); });
window.addEventListener("hashchange", () => { if (state) renderSelected(); });
connect();
