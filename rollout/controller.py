"""The rollout controller: per model, a stable version, a candidate, a strategy and a
history; observations in, decisions out.

Drive it with `observe(obs)` for every observation and `tick()` on a timer (every second
or so); both return the decisions made, to be published on vigil.rollout. A firing alert
with the rollout's labels is acted on inside `observe`. Operator commands (start, pause,
resume, promote, abort, undo, set_flag) return the decision they made. Nothing here
sleeps or does I/O; time is read from the injected clock.

It decides from signals and alerts only: the processors compare the candidate with
stable over the same traffic and publish the figures (the `*_vs_stable` series of
eventbus/signals.py, analysis.py reads them); the drift signals of both versions; the
alerts on the candidate. A step holds until its analysis interval has passed; the analysis
is then conclusive only if the candidate served at least `min_requests` requests in the
step, as the processors' comparisons count them. Inconclusive
and marginal analyses hold the step (the window keeps growing) and are counted; past
`inconclusive_limit` in a row the rollout pauses with `attention` set. It never rolls back
for lack of data. Failed analyses past `failure_limit`, a firing alert, or `abort` put all
traffic back on the stable version in one decision.

After a rollout, the response policy (policy.py, `Controller.policy`) decides what a firing
alert on a version in production leads to: `fallback` (the promoted version's traffic goes
back to the last healthy one: the previous stable version, kept loaded for the rollout's
`watch` seconds after the promotion, listed in `keep_loaded`), `recalibrate` (the
processors' latest fitted temperature for the version, published in `temperatures`, where
it lowers held-out ECE; until one does, the action waits and is tried again on each new
temperature while the alert fires), `retrain` (left to the service, which sends the request: the
record's outcome is "pending"), `notify-only`. Each is an ActionRecord, queued for the
service (`take_actions`), keyed by (rule, alert fingerprint, alert start), so one alert
instance acts once per rule (`load_actions` takes those already recorded); a rule acts on a
model version again only after its cooldown, and on a model at most `limit` times per
`window`. With `dry_run` an action is recorded with outcome "dry-run" and changes nothing.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any, Iterable

from eventbus.flags import Flag, FlagError
from eventbus.signals import Feature

from . import analysis as an
from . import policy as pol
from .config import RolloutConfig, plan
from .records import (ACTIVE, BLUEGREEN, FAILED, PAUSED, PROGRESSING, PROMOTED, ROLLED_BACK, SHADOW,
                      STABLE, ActionRecord, AlertObs, Decision, Observation, RolloutError, SignalObs, SystemClock)

HISTORY_LIMIT = 500
ACTED_LIMIT = 10000   # action ids remembered (the actions topic keeps them all)
SIGNALS_KEPT = 20     # drifted series remembered per version, for a retrain request


WAITING = "waiting"   # recalibrate: no temperature yet that lowers held-out ECE; tried again on the next one
                      # while the alert fires


def action_id(rule: str, fingerprint: str, starts_at: float) -> str:
    """The identity of one rule's action on one alert instance (its fingerprint and start)."""
    raw = f"{rule}\0{fingerprint}\0{int(round(starts_at * 1000))}".encode()
    return hashlib.sha256(raw).hexdigest()[:32]


@dataclass
class ModelState:
    model: str
    stable: str
    versions: list[str]
    lineage: list[str] = field(default_factory=list)  # earlier stable versions, oldest first
    phase: str = STABLE
    candidate: str = ""
    config: RolloutConfig | None = None
    step: int = 0
    step_started: float = 0.0
    next_analysis: float = 0.0
    undecided: int = 0        # inconclusive or marginal analyses in a row
    failures: int = 0
    keep_until: float = 0.0   # blue/green: the old version stays loaded until then
    attention: bool = False
    weights: dict[str, float] = field(default_factory=dict)
    shadow: list[str] = field(default_factory=list)
    windows: dict[str, an.Window] = field(default_factory=dict)
    baseline: an.Window | None = None  # stable's last window with drift verdicts, for steps where it serves nothing
    counted: int = 0          # the candidate's events the processors had compared, at the latest comparison
    firing: dict[str, dict] = field(default_factory=dict)  # alert fingerprint -> rule, labels
    flags: dict[str, Flag] = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    generation: int = 0
    reason: str = ""
    figures: dict = field(default_factory=dict)
    time: float = 0.0
    last_healthy: str = ""    # the stable version before the latest promotion, while it is watched
    watch_until: float = 0.0
    keep_loaded: list[str] = field(default_factory=list)
    temperatures: dict[str, float] = field(default_factory=dict)
    recalibration: dict[str, dict] = field(default_factory=dict)  # version -> latest temperature reading
    drifted: dict[str, dict] = field(default_factory=dict)        # version -> series -> latest drifted reading

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["config"] = self.config.to_dict() if self.config else None
        d["windows"] = {v: w.to_dict() for v, w in self.windows.items()}
        d["baseline"] = self.baseline.to_dict() if self.baseline else None
        d["flags"] = {n: f.to_dict() for n, f in self.flags.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelState":
        d = dict(d)
        d["config"] = RolloutConfig.from_dict(d["config"]) if d.get("config") else None
        d["windows"] = {v: an.Window.from_dict(w) for v, w in d.get("windows", {}).items()}
        d["baseline"] = an.Window.from_dict(d["baseline"]) if d.get("baseline") else None
        d["flags"] = {n: Flag.from_dict(f) for n, f in d.get("flags", {}).items()}
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


class Controller:
    def __init__(self, clock=None, defaults: RolloutConfig | None = None, policy: pol.Policy | None = None,
                 dry_run: bool = False):
        self.clock = clock or SystemClock()
        self.defaults = defaults or RolloutConfig()
        self.models: dict[str, ModelState] = {}
        self.policy = policy or pol.EMPTY
        self.dry_run = dry_run
        self.acted: dict[str, ActionRecord] = {}   # action id -> its record (done, dry-run, skipped, ...)
        self.queued: list[ActionRecord] = []       # made since the service last took them

    # ---- versions -------------------------------------------------------------------

    def register(self, model: str, *versions: str, stable: str = "") -> Decision | None:
        """Make versions known. The first registration of a model sets its stable version
        (`stable`, or the first version given) and returns that decision."""
        if not model:
            raise RolloutError("model", "is empty")
        if stable and stable not in versions:
            versions = (*versions, stable)
        if not versions or not all(versions):
            raise RolloutError("version", "a version name is empty")
        m = self.models.get(model)
        if m is None:
            first = stable or versions[0]
            m = self.models[model] = ModelState(model, first, list(dict.fromkeys(versions)),
                                                weights={first: 1.0})
            return self._decide(m, f"{model} registered; {first} takes all traffic")
        if stable and stable != m.stable:
            raise RolloutError("stable", f"{model} is already stable on {m.stable}; promote or undo to change it")
        m.versions.extend(v for v in versions if v not in m.versions)
        return None

    # ---- operator commands ----------------------------------------------------------

    def start(self, model: str, candidate: str, strategy: str | None = None, steps: Iterable[float] | None = None,
              stable: str = "", register: bool = False, **settings) -> Decision:
        """`stable` registers a model not seen yet, with that stable version and the
        candidate; `register` makes an unknown candidate of a known model known. Both
        happen only once the whole request has been found good: a refused start changes
        nothing."""
        m = self.models.get(model)
        if m is None and not stable:
            raise RolloutError("model", f"unknown model {model!r}" + (
                ": no event of it seen yet; name its stable version (--stable)" if register else ""))
        if m is not None and m.phase in ACTIVE:
            raise RolloutError("model", f"{model} already has a rollout of {m.candidate} ({m.phase})")
        if m is not None and not register and candidate not in m.versions:
            raise RolloutError("candidate", f"{model} has no version {candidate!r} "
                               f"(known: {', '.join(m.versions)})")
        if candidate == (m.stable if m is not None else stable):
            raise RolloutError("candidate", f"{candidate!r} is already the stable version")
        d = self.defaults.to_dict()
        if isinstance(settings.get("thresholds"), dict):
            settings["thresholds"] = {**d["thresholds"], **settings["thresholds"]}
        d.update({k: v for k, v in settings.items() if v is not None})
        if strategy is not None:
            d["strategy"] = strategy
        if steps is not None:
            d["steps"] = list(steps)
        config = RolloutConfig.from_dict(d)
        if m is None:
            self.register(model, stable, candidate, stable=stable)
            m = self.models[model]
        elif candidate not in m.versions:
            m.versions.append(candidate)
        m.config = config
        m.candidate, m.phase, m.attention, m.baseline, m.keep_until = candidate, PROGRESSING, False, None, 0.0
        m.last_healthy, m.watch_until, m.keep_loaded = "", 0.0, []
        m.windows, m.counted = {}, 0
        return self._enter_step(m, 0, f"started {m.config.strategy} of {candidate} against {m.stable}")

    def pause(self, model: str, reason: str = "paused by operator") -> Decision:
        m = self._active(model)
        m.phase, m.attention = PAUSED, False
        return self._decide(m, reason)

    def resume(self, model: str) -> Decision:
        m = self._active(model)
        if m.phase != PAUSED:
            raise RolloutError("model", f"{model} is not paused")
        m.phase, m.attention, m.undecided = PROGRESSING, False, 0
        m.next_analysis = self._now() + m.config.interval  # the step's data so far still counts
        return self._decide(m, f"resumed at step {m.step} by operator")

    def promote(self, model: str) -> Decision:
        m = self._active(model)
        return self._promote(m, f"by operator at step {m.step}", {})

    def abort(self, model: str) -> Decision:
        m = self._active(model)
        return self._end(m, ROLLED_BACK, "aborted", f"by operator at step {m.step}", {})

    def undo(self, model: str) -> Decision:
        """Go back one stable version."""
        m = self._model(model)
        if m.phase in ACTIVE:
            raise RolloutError("model", f"{model} has a rollout in progress; abort it instead")
        if not m.lineage:
            raise RolloutError("model", f"{model} has no earlier version to go back to")
        prev, cur = m.lineage.pop(), m.stable
        m.stable, m.phase, m.weights, m.shadow = prev, ROLLED_BACK, {prev: 1.0}, []
        m.last_healthy, m.watch_until, m.keep_loaded = "", 0.0, []
        reason = f"undo by operator: back to {prev} from {cur}"
        self._record(m, "undo", prev, cur, reason, {})
        return self._decide(m, reason)

    def set_flag(self, model: str, flag: Flag | dict) -> Decision:
        m = self._model(model)
        try:
            f = flag if isinstance(flag, Flag) else Flag.from_dict(flag)
        except FlagError as e:
            raise RolloutError(e.field, str(e).removeprefix(f"{e.field}: ")) from None
        m.flags[f.name] = f
        return self._decide(m, f"flag {f.name} set to {f.percentage:g}%"
                            f"{'' if f.enabled else ' (disabled)'} with {len(f.rules)} rules")

    def remove_flag(self, model: str, name: str) -> Decision:
        m = self._model(model)
        if m.flags.pop(name, None) is None:
            raise RolloutError("flag", f"{model} has no flag {name!r}")
        return self._decide(m, f"flag {name} removed")

    # ---- queries --------------------------------------------------------------------

    def decision(self, model: str) -> Decision:
        """The model's current state as a decision record (what was last decided)."""
        return self._decision(self._model(model))

    def status(self, model: str) -> dict:
        m = self._model(model)
        out = self._decision(m).to_dict()
        del out["state"]
        cand = m.windows.get(m.candidate)
        out.update(versions=list(m.versions), undecided=m.undecided, failures=m.failures,
                   next_analysis=m.next_analysis if m.phase == PROGRESSING else None,
                   config=m.config.to_dict() if m.config else None,
                   window={"requests": cand.sample, "comparisons": sorted(cand.readings)} if cand else {})
        return out

    def list_models(self) -> list[str]:
        return sorted(self.models)

    def history(self, model: str) -> list[dict]:
        return list(self._model(model).history)

    # ---- observations and time ------------------------------------------------------

    def observe(self, obs: Observation) -> list[Decision]:
        if isinstance(obs, AlertObs):
            return self._alert(obs)
        assert isinstance(obs, SignalObs)
        m = self.models.get(obs.model)
        if m is None:
            if obs.reference_version and obs.reference_version != obs.version:  # a comparison names stable
                self.register(obs.model, obs.reference_version, obs.version, stable=obs.reference_version)
            return []
        if obs.version not in m.versions:
            m.versions.append(obs.version)
        self._remember(m, obs)
        if obs.recalibration is not None and m.firing:
            return self._retry_waiting(m, obs.version)
        if m.phase not in ACTIVE:
            return []
        ours = obs.version == m.candidate and obs.reference_version == m.stable
        if ours and obs.detector in an.JUDGED and obs.feature != Feature.LABEL:
            m.counted = max(m.counted, obs.events)
        w = m.windows.get(obs.version)
        if w is None or (obs.time or self._now()) < w.start:
            return []
        if obs.detector in an.JUDGED:
            if ours:
                w.add_reading(obs)
        elif obs.kind in ("drift", ""):
            w.add_drift(obs.detector, obs.feature, obs.drifted, obs.statistic)
        return []

    def tick(self) -> list[Decision]:
        now = self._now()
        out = []
        for m in list(self.models.values()):
            if m.phase in ACTIVE and (alert := self._firing_for(m)):
                out.append(self._alert_rollback(m, alert))
            elif m.phase == PROGRESSING and now >= m.next_analysis:
                out.append(self._analyse(m, now))
            elif m.last_healthy and now >= m.watch_until and m.phase not in ACTIVE:
                old = m.last_healthy
                m.last_healthy, m.watch_until, m.keep_loaded = "", 0.0, []
                out.append(self._decide(m, f"watch of {m.stable} ended without a fallback; {old} need no longer "
                                           f"stay loaded"))
        return out

    # ---- persistence ----------------------------------------------------------------

    def snapshot(self) -> dict:
        return {"models": {n: m.to_dict() for n, m in self.models.items()}}

    @classmethod
    def restore(cls, snapshot: dict, clock=None, defaults: RolloutConfig | None = None,
                policy: pol.Policy | None = None, dry_run: bool = False) -> "Controller":
        c = cls(clock, defaults, policy, dry_run)
        c.models = {n: ModelState.from_dict(d) for n, d in snapshot.get("models", {}).items()}
        return c

    @classmethod
    def from_records(cls, records: Iterable[Decision | dict], clock=None, defaults: RolloutConfig | None = None,
                     policy: pol.Policy | None = None, dry_run: bool = False) -> "Controller":
        """Resume from decision records (vigil.rollout read to its end): the latest per model."""
        latest: dict[str, dict] = {}
        for r in records:
            d = r.to_dict() if isinstance(r, Decision) else r
            if d.get("state") and d["generation"] >= latest.get(d["model"], {}).get("generation", -1):
                latest[d["model"]] = d
        return cls.restore({"models": {n: d["state"] for n, d in latest.items()}}, clock, defaults, policy, dry_run)

    # ---- internals ------------------------------------------------------------------

    def _now(self) -> float:
        return self.clock.now()

    def _model(self, model: str) -> ModelState:
        m = self.models.get(model)
        if m is None:
            raise RolloutError("model", f"unknown model {model!r}")
        return m

    def _active(self, model: str) -> ModelState:
        m = self._model(model)
        if m.phase not in ACTIVE:
            raise RolloutError("model", f"{model} has no rollout in progress ({m.phase})")
        return m

    def _reset_windows(self, m: ModelState, now: float) -> None:
        m.windows = {m.stable: an.Window(now), m.candidate: an.Window(now, base=m.counted, events=m.counted)}
        m.step_started, m.next_analysis = now, now + m.config.interval

    def _enter_step(self, m: ModelState, i: int, reason: str, figures: dict | None = None) -> Decision:
        now = self._now()
        pct, shadowed = plan(m.config)[i]
        old = m.windows.get(m.stable)
        if old is not None and old.drift:
            m.baseline = old
        m.step = i
        share = pct / 100.0
        m.weights = {m.stable: 1.0 - share, m.candidate: share}
        m.shadow = [m.candidate] if shadowed else []
        if m.config.strategy == BLUEGREEN and i == 1:
            m.keep_until = now + m.config.keep_old_for
        m.undecided = m.failures = 0
        self._reset_windows(m, now)
        return self._decide(m, f"{reason}; step {i} ({self._step_name(m)})", figures or {})

    def _step_name(self, m: ModelState) -> str:
        pct, shadowed = plan(m.config)[m.step]
        return f"shadow of {m.candidate}" if shadowed else f"{pct:g}% on {m.candidate}"

    def _analyse(self, m: ModelState, now: float) -> Decision:
        cfg = m.config
        cand, stab = m.windows[m.candidate], m.windows[m.stable]
        base = ""
        if not stab.drift and m.baseline is not None:
            stab, base = m.baseline, " (stable's drift signals from the previous step)"
        where = f"step {m.step} ({self._step_name(m)})"
        m.next_analysis = now + cfg.interval
        if cand.sample < cfg.min_requests:
            result = an.Analysis(an.INCONCLUSIVE, None, [])
            text = f"candidate served {cand.sample} of {cfg.min_requests} requests needed"
            figures = {"verdict": an.INCONCLUSIVE, "candidate_n": cand.sample, "min_requests": cfg.min_requests}
        else:
            result = an.analyse(cand, stab, cfg.thresholds)
            text, figures = result.summary() + base, result.figures()
        figures["undecided"], figures["failures"] = m.undecided, m.failures

        if result.verdict in (an.INCONCLUSIVE, an.MARGINAL):
            m.undecided += 1
            figures["undecided"] = m.undecided
            if m.undecided > cfg.inconclusive_limit:
                m.phase, m.attention = PAUSED, True
                return self._decide(m, f"paused: {where} {result.verdict} {m.undecided} times in a row "
                                    f"(limit {cfg.inconclusive_limit}): {text}", figures)
            return self._decide(m, f"{where} {result.verdict} ({m.undecided}/{cfg.inconclusive_limit}): {text}",
                                figures)
        m.undecided = 0
        if result.verdict == an.FAIL:
            m.failures += 1
            figures["failures"] = m.failures
            failed = ", ".join(c.name for c in result.failed) or "score"
            if m.failures > cfg.failure_limit:
                traffic = any(w > 0 for v, w in m.weights.items() if v == m.candidate)
                return self._end(m, ROLLED_BACK if traffic else FAILED, "rolled_back" if traffic else "failed",
                                 f"{where} failed on {failed}: {text}", figures)
            self._reset_windows(m, now)
            return self._decide(m, f"{where} failed on {failed} ({m.failures}/{cfg.failure_limit} tolerated): "
                                f"{text}", figures)
        # passed
        last = m.step == len(plan(cfg)) - 1
        if cfg.strategy == SHADOW:
            m.failures = 0
            self._reset_windows(m, now)
            return self._decide(m, f"{where} passed: {text}; waiting for promote or abort", figures)
        if last and now < m.keep_until:
            return self._decide(m, f"{where} passed: {text}; old version {m.stable} stays loaded until "
                                f"{m.keep_until:.0f}", figures)
        if last:
            return self._promote(m, f"{where} passed: {text}", figures)
        return self._enter_step(m, m.step + 1, f"{where} passed: {text}", figures)

    def _promote(self, m: ModelState, reason: str, figures: dict) -> Decision:
        old, new = m.stable, m.candidate
        m.lineage.append(old)
        m.stable, m.candidate, m.phase, m.attention = new, "", PROMOTED, False
        m.weights, m.shadow, m.windows, m.baseline = {new: 1.0}, [], {}, None
        watch = m.config.watch if m.config else 0.0
        if watch > 0:
            m.last_healthy, m.watch_until, m.keep_loaded = old, self._now() + watch, [old]
        reason = f"promoted {new} over {old}: {reason}" + (f"; {old} stays loaded for {watch:g}s as the last "
                                                           f"healthy version" if watch > 0 else "")
        self._record(m, "promoted", new, old, reason, figures)
        return self._decide(m, reason, figures)

    def _end(self, m: ModelState, phase: str, action: str, reason: str, figures: dict) -> Decision:
        cand = m.candidate
        m.phase, m.candidate, m.attention = phase, "", False
        m.weights, m.shadow, m.windows, m.baseline = {m.stable: 1.0}, [], {}, None
        reason = f"{action.replace('_', ' ')} {cand}, all traffic to {m.stable}: {reason}"
        self._record(m, action, m.stable, cand, reason, figures)
        return self._decide(m, reason, figures)

    def _alert(self, a: AlertObs) -> list[Decision]:
        if a.state == "firing":
            target = self.models.get(a.labels.get("model", ""))
            out = []
            if target is not None:
                target.firing[a.fingerprint] = {"rule": a.rule, "labels": dict(a.labels), "time": a.time,
                                                "starts_at": a.starts_at}
                if target.phase in ACTIVE and self._firing_for(target):
                    out.append(self._alert_rollback(target, self._firing_for(target)))
            return out + self._respond(a)
        else:
            for m in self.models.values():
                m.firing.pop(a.fingerprint, None)
        return []

    def _firing_for(self, m: ModelState) -> dict | None:
        for fp, a in sorted(m.firing.items()):
            if a["labels"].get("model") == m.model and a["labels"].get("version") == m.candidate:
                return {"fingerprint": fp, **a}
        return None

    def _alert_rollback(self, m: ModelState, alert: dict) -> Decision:
        traffic = m.weights.get(m.candidate, 0.0) > 0
        labels = ",".join(f'{k}="{v}"' for k, v in sorted(alert["labels"].items()))
        return self._end(m, ROLLED_BACK if traffic else FAILED, "rolled_back" if traffic else "failed",
                         f"alert {alert['rule']}{{{labels}}} firing at step {m.step}",
                         {"alert": alert["rule"], "labels": alert["labels"], "fingerprint": alert["fingerprint"]})

    # ---- response policy ------------------------------------------------------------

    def set_policy(self, policy: pol.Policy, dry_run: bool | None = None) -> None:
        self.policy = policy
        if dry_run is not None:
            self.dry_run = dry_run

    def load_actions(self, records: Iterable[ActionRecord | dict]) -> None:
        """Actions already recorded (vigil.actions read back): none of them is taken again,
        and they count towards cooldowns and limits."""
        for r in records:
            a = r if isinstance(r, ActionRecord) else ActionRecord.from_dict(r)
            self.acted[a.action_id] = a
        self._trim()

    def take_actions(self) -> list[ActionRecord]:
        out, self.queued = self.queued, []
        return out

    def actions(self, model: str) -> list[dict]:
        """The response policy's actions about the model's alerts, oldest first."""
        return sorted((a.to_dict() for a in self.acted.values() if a.model == model), key=lambda a: a["time"])

    def settle(self, record: ActionRecord) -> None:
        """The final outcome of an action the service carried out (retrain: sent or failed)."""
        self.acted[record.action_id] = record

    def _trim(self) -> None:
        if len(self.acted) > ACTED_LIMIT:
            for k in sorted(self.acted, key=lambda k: self.acted[k].time)[:len(self.acted) - ACTED_LIMIT]:
                del self.acted[k]

    def _remember(self, m: ModelState, obs: SignalObs) -> None:
        t = obs.time or self._now()
        if obs.recalibration is not None:
            m.recalibration[obs.version] = {**obs.recalibration, "time": t}
        if obs.drifted and not obs.reference_version:
            series = m.drifted.setdefault(obs.version, {})
            series[f"{obs.detector}/{obs.feature}"] = {"detector": obs.detector, "feature": obs.feature,
                                                       "kind": obs.kind, "statistic": obs.statistic,
                                                       "p_value": obs.p_value, "time": t}
            if len(series) > SIGNALS_KEPT:
                del series[min(series, key=lambda k: series[k]["time"])]

    def _respond(self, a: AlertObs) -> list[Decision]:
        if not self.policy.rules:
            return []
        labels = dict(a.labels)
        labels.setdefault("alertname", a.rule)
        out = []
        for rule in self.policy.matching(labels):
            aid = action_id(rule.name, a.fingerprint, a.starts_at)
            before = self.acted.get(aid)
            if before is not None and before.outcome != WAITING:
                continue  # this alert instance was acted on by this rule already (a redelivery, a restart)
            rec = ActionRecord(aid, rule.action, labels.get("model", ""), labels.get("version", ""), rule.name, "",
                               "", a.fingerprint, a.rule, a.starts_at, labels, self._now())
            decision = self._act(rule, rec, a)
            if decision is not None:
                out.append(decision)
                rec.generation = decision.generation
            if before is not None and rec.outcome == WAITING and rec.reason == before.reason:
                continue  # still waiting, for the same reason: nothing new to record
            self.acted[aid] = rec
            self.queued.append(rec)
        self._trim()
        return out

    def _retry_waiting(self, m: ModelState, version: str) -> list[Decision]:
        """A new temperature for `version`: the recalibrations waiting for one, on alerts
        about it still firing, are tried again."""
        out = []
        for fp, f in sorted(m.firing.items()):
            if f["labels"].get("version") == version and any(
                    a.outcome == WAITING and a.alert_fingerprint == fp for a in self.acted.values()):
                out += self._respond(AlertObs(fp, f["rule"], "firing", f["labels"], f["time"], f.get("starts_at", 0.0)))
        return out

    def _wait(self, rec: ActionRecord, why: str) -> None:
        rec.outcome, rec.reason = WAITING, f"{rec.action} by {rec.policy} waits: {why}"

    def _skip(self, rec: ActionRecord, why: str) -> None:
        rec.outcome, rec.reason = "skipped", f"{rec.action} by {rec.policy} skipped: {why}"

    def _limited(self, rule: pol.PolicyRule, rec: ActionRecord) -> str:
        now = self._now()
        mine = [x for x in self.acted.values() if x.policy == rule.name and x.model == rec.model
                and x.outcome not in ("skipped", WAITING)]
        recent = [x for x in mine if x.version == rec.version and now - x.time < rule.cooldown]
        if recent:
            last = max(x.time for x in recent)
            return (f"in the cooldown of {rule.cooldown:g}s after the action on {rec.model} {rec.version} "
                    f"{now - last:.0f}s ago")
        in_window = [x for x in mine if now - x.time < rule.window]
        if len(in_window) >= rule.limit:
            return f"{len(in_window)} actions on {rec.model} in the last {rule.window:g}s (limit {rule.limit})"
        return ""

    def _act(self, rule: pol.PolicyRule, rec: ActionRecord, a: AlertObs) -> Decision | None:
        m = self.models.get(rec.model)
        what = f"alert {a.rule}{{{_labels(rec.alert_labels)}}}"
        if rule.action == pol.NOTIFY:
            if why := self._limited(rule, rec):
                return self._skip(rec, why)
            rec.outcome = "dry-run" if self.dry_run else "done"
            rec.reason = f"{what} noted by {rule.name} (notify-only)"
            return None
        if m is None:
            return self._skip(rec, f"model {rec.model or '(no model label)'} is not known to the controller")
        if not rec.version:
            return self._skip(rec, "the alert names no version")
        if rule.action == pol.FALLBACK:
            return self._fallback(m, rule, rec, what)
        if rule.action == pol.RECALIBRATE:
            return self._recalibrate(m, rule, rec, what)
        assert rule.action == pol.RETRAIN
        if why := self._limited(rule, rec):
            return self._skip(rec, why)
        rec.outcome = "dry-run" if self.dry_run else "pending"
        rec.reason = f"retrain {rec.model} {rec.version}: {what} (policy rule {rule.name})"
        rec.details = {"url": rule.url, "signals": sorted(m.drifted.get(rec.version, {}).values(),
                                                          key=lambda s: s["time"]),
                       "since": max(0.0, (a.starts_at or a.time) - rule.lookback)}
        return None

    def _fallback(self, m: ModelState, rule: pol.PolicyRule, rec: ActionRecord, what: str) -> Decision | None:
        now = self._now()
        if m.phase in ACTIVE:
            return self._skip(rec, f"a rollout of {m.candidate} is in progress; its analysis decides")
        if rec.version != m.stable:
            return self._skip(rec, f"{rec.version} is not the version in production ({m.stable})")
        watched = bool(m.last_healthy) and now < m.watch_until
        if watched:
            prev = m.last_healthy
        elif rule.during == pol.ALWAYS and m.lineage:
            prev = m.lineage[-1]
        else:
            return self._skip(rec, f"no earlier version of {m.model} is watched (rule {rule.name} falls back "
                                   f"only during the watch after a promotion)" if rule.during == pol.WATCH
                              else f"{m.model} has no earlier version")
        if why := self._limited(rule, rec):
            return self._skip(rec, why)
        rec.target_version = prev
        cur = m.stable
        since = f", {now - (m.watch_until - m.config.watch):.0f}s after its promotion" if watched and m.config else ""
        reason = f"fallback of {m.model} from {cur} to {prev}: {what} firing on {cur}{since} (policy rule {rule.name})"
        rec.details = {"from": cur, "to": prev, "watched": watched}
        if self.dry_run:
            rec.outcome, rec.reason = "dry-run", f"would have done: {reason}"
            return None
        if m.lineage and m.lineage[-1] == prev:
            m.lineage.pop()
        m.stable, m.phase, m.weights, m.shadow = prev, ROLLED_BACK, {prev: 1.0}, []
        m.last_healthy, m.watch_until, m.keep_loaded = "", 0.0, []
        figures = {"alert": rec.alert_name, "labels": rec.alert_labels, "fingerprint": rec.alert_fingerprint,
                   "policy": rule.name, "action_id": rec.action_id}
        self._record(m, "fallback", prev, cur, reason, figures)
        rec.outcome, rec.reason = "done", reason
        return self._decide(m, reason, figures)

    def _recalibrate(self, m: ModelState, rule: pol.PolicyRule, rec: ActionRecord, what: str) -> Decision | None:
        r = m.recalibration.get(rec.version)
        if r is None:
            return self._wait(rec, f"no temperature from the processors for {m.model} {rec.version} yet")
        t, before, after = r.get("temperature", 0.0), r.get("ece_before", 0.0), r.get("ece_after", 0.0)
        held = int(r.get("held_out", 0))
        rec.details = {"temperature": t, "ece_before": before, "ece_after": after, "held_out": held,
                       "fitted": int(r.get("fitted", 0)), "accuracy": r.get("accuracy")}
        if not (math.isfinite(t) and t > 0):
            return self._wait(rec, f"the fitted temperature {t!r} is not a positive number")
        if held < rule.min_held_out:
            return self._wait(rec, f"the temperature was judged on {held} held-out feedbacks, {rule.min_held_out} "
                                   f"needed")
        if not after < before - rule.min_improvement:
            return self._wait(rec, f"temperature {t:.3g} does not lower held-out ECE enough ({before:.4f} -> "
                                   f"{after:.4f}, {rule.min_improvement:g} needed); the current one is kept")
        if why := self._limited(rule, rec):
            return self._skip(rec, why)
        reason = (f"recalibrated {m.model} {rec.version}: temperature {t:.4g} (held-out ECE {before:.4f} -> "
                  f"{after:.4f} over {held}) on {what} (policy rule {rule.name})")
        if self.dry_run:
            rec.outcome, rec.reason = "dry-run", f"would have done: {reason}"
            return None
        # the processors fit on the probabilities as served, already scaled by the current one
        m.temperatures[rec.version] = m.temperatures.get(rec.version, 1.0) * float(t)
        self._record(m, "recalibrated", rec.version, rec.version, reason, dict(rec.details))
        rec.outcome, rec.reason = "done", reason
        return self._decide(m, reason, dict(rec.details))

    def _record(self, m: ModelState, action: str, to: str, frm: str, reason: str, figures: dict) -> None:
        m.history.append({"time": self._now(), "action": action, "to": to, "from": frm,
                          "strategy": m.config.strategy if m.config else "", "step": m.step,
                          "reason": reason, "figures": figures})
        del m.history[:-HISTORY_LIMIT]

    def _decide(self, m: ModelState, reason: str, figures: dict | None = None) -> Decision:
        m.generation += 1
        m.time, m.reason, m.figures = self._now(), reason, _clean(figures or {})
        return self._decision(m)

    def _decision(self, m: ModelState) -> Decision:
        return Decision(model=m.model, generation=m.generation, time=m.time, phase=m.phase, stable=m.stable,
                        candidate=m.candidate, strategy=m.config.strategy if m.config else "", step=m.step,
                        weights=dict(m.weights), shadow=list(m.shadow), reason=m.reason, figures=m.figures,
                        attention=m.attention, flags={n: f.to_dict() for n, f in m.flags.items()},
                        state=m.to_dict(), keep_loaded=list(m.keep_loaded), temperatures=dict(m.temperatures))


def _labels(labels: dict) -> str:
    return ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))


def _clean(x: Any) -> Any:
    """Figures as JSON can carry them (an infinite ratio becomes a string)."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return x
