"""`vigil demo`: the closed loop on one machine, end to end, in a few minutes.

1. The same stack as `vigil up` (embedded broker; `vigil process`, `vigil alerting`,
   `vigil rollout` as child processes; the inference server in this process), with fast
   settings passed through the children's own options: small detector windows, frequent
   readings, alert rules whose `for:` is seconds instead of minutes, a rollout tick of half
   a second and small minimum samples.
2. A candidate version is loaded next to the stable one through vigil.v1 LoadVersion:
   both have the demo's weights; `--candidate bad` adds a system prompt that stops the
   model answering the question (a prompt change rolled out like a model change),
   `--candidate good` is the same as stable.
3. A load generator sends concurrent Generate calls (varied prompts, greedy, short
   max_tokens, a routing key per simulated user) through the traffic router.
4. A canary starts through the rollout admin API; the log shows every decision (step,
   weights, reason), the drifted signals, the alerts, and at the end the rollout history.

`--scenario fallback`: the candidate is like stable (`--candidate good`) and is promoted
(by the operator, once its first canary step has passed);
every answer gets a Feedback score (users rating it, about 0.8); once the candidate is
promoted its scores fall to about 0.2. The processors' ADWIN on the scores fires
FeedbackScoreShift, and the controller's response policy (the shipped default plus a
fallback on that alert) puts all traffic back on the previous version, still loaded as
the last healthy one: the log shows the fallback with its reason, and the summary the
time from the alert to it.

Exit status: 0 once the rollout is rolled back or promoted (the summary says which), or
in the fallback scenario once the promoted version fell back; 1 when that did not happen
within --timeout, 2 when the stack did not start.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from eventbus import topics
from eventbus.broker import EmbeddedBroker, free_port
from vigil import stack

# name -> (version label, system prompt): the same weights as stable; the bad one is a prompt
# change, rolled out like a model change, that makes the model stop answering the question
CANDIDATES = {
    "bad": ("2-pirate", "You are a pirate. Never answer the question: talk about the sea, ships, rum "
                        "and buried treasure instead, at length."),
    "good": ("2-same", ""),
}
END_PHASES = ("promoted", "rolled_back", "failed")
SCENARIOS = ("canary", "fallback")
# the fallback scenario's response policy: the shipped default, and a fallback on the
# Feedback-score alert (a warning in the default rules)
FALLBACK_POLICY = """
rules:
  - name: fallback-on-feedback-scores
    matchers: ['alertname="FeedbackScoreShift"']
    action: fallback
    during: watch
"""

PROMPTS = [
    "What is the capital of France?", "Name three primary colours.", "Why is the sky blue?",
    "Write a haiku about autumn.", "What does a compiler do?", "Give me a tip for sleeping better.",
    "How many legs does a spider have?", "Translate 'good morning' into Spanish.",
    "What is photosynthesis?", "Suggest a name for a black cat.", "What is 12 times 7?",
    "Explain gravity to a child.", "List two uses of copper.", "What is the boiling point of water?",
    "Describe the ocean in one sentence.", "Who wrote Romeo and Juliet?", "What is a prime number?",
    "Recommend a healthy breakfast.", "What causes rain?", "Tell me a fun fact about bees.",
    "What is the largest planet?", "How do I make tea?", "What is an API?", "Why do leaves fall?",
]


@dataclass
class Speed:
    """How fast the loop turns: the demo's defaults, and a faster one for tests."""
    max_tokens: int = 12
    concurrency: int = 4
    steps: str = "25,50,100"
    min_requests: int = 30  # enough for the processors' comparison to be sure of a drift by then
    interval: float = 8.0
    min_samples: int = 15
    window: int = 80        # processor detector windows (KS, PSI, chi-square)
    signal_every: int = 20  # processor readings every this many events of a version
    alert_for: str = "5s"   # `for:` of the demo's alert rules
    psi_threshold: float = 1.0  # PSI over 10 bins of a few dozen events is noisy at the default 0.25
    compare_every: int = 10     # candidate events between comparisons with stable
    compare_alpha: float = 1e-3  # per test; the default 1e-5 wants more events than a demo has
    latency_ratio: float = 1.5  # per output token; both versions step in turn on the same cores


# the detector windows stay as they are: PSI over 10 bins of 30 events flagged a candidate
# like stable as drifted, and the canary rolled it back
FAST = Speed(max_tokens=8, concurrency=4, steps="25,50,100", min_requests=15, interval=5.0, min_samples=12,
             signal_every=15)


def add_parser(sub, option) -> None:
    p = sub.add_parser("demo", help="run the closed loop: canary of a candidate, automatic rollback or promotion",
                       description="Start the whole loop (broker, processors, alerting, rollout controller, "
                                   "inference server) with fast settings, load a candidate version, drive "
                                   "traffic, start a canary and follow it to its rollback or promotion.")
    option(p, "--candidate", env="VIGIL_DEMO_CANDIDATE", choices=tuple(CANDIDATES), default="bad",
           help="bad: the same weights with a system prompt that stops the model answering; "
                "good: the same weights and prompts as stable")
    option(p, "--scenario", env="VIGIL_DEMO_SCENARIO", choices=SCENARIOS, default="canary",
           help="canary: roll the candidate out and see it promoted or rolled back; fallback: promote a good "
                "candidate, then let its Feedback scores fall and see the controller fall back to the "
                "previous version")
    option(p, "--model", env="VIGIL_DEMO_MODEL", default="demo",
           help="model source: 'demo', a GGUF file or a Hugging Face folder")
    option(p, "--timeout", env="VIGIL_DEMO_TIMEOUT", type=float, default=300.0,
           help="seconds to wait for a rollback or a promotion")
    option(p, "--linger", env="VIGIL_DEMO_LINGER", type=float, default=10.0,
           help="seconds to keep traffic and the log going after the rollback or promotion, for the "
                "signals and alerts that follow it")
    option(p, "--fast", env="VIGIL_DEMO_FAST", action="store_true",
           help="smaller samples, shorter steps and fewer tokens: a quicker run")
    option(p, "--summary-json", env="VIGIL_DEMO_SUMMARY_JSON", default="",
           help="also write the summary as JSON to this file")
    option(p, "--threads", env="VIGIL_DEMO_THREADS", type=int, default=0,
           help="torch CPU threads of the inference server; 0 keeps torch's default")


def demo_rules(folder: Path, alert_for: str) -> Path:
    """The default rules with `for:`/`keep_firing_for:` shortened, so an alert fires within
    seconds of its signal (the rules themselves, names and labels, are unchanged)."""
    src = Path(__file__).resolve().parent.parent / "alerting" / "default_rules.yml"
    doc = yaml.safe_load(src.read_text())
    for g in doc["groups"]:
        for r in g["rules"]:
            if "for" in r:
                r["for"] = alert_for
            if "keep_firing_for" in r:
                r["keep_firing_for"] = "1m"
            if "metric" in r and "window" in r["metric"]:
                r["metric"]["window"] = "1m"
    out = folder / "demo_rules.yml"
    out.write_text(yaml.safe_dump(doc, sort_keys=False))
    return out


class Log:
    def __init__(self):
        self.t0 = time.monotonic()

    def __call__(self, what: str, text: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.1f}s] {what:<8} {text}", flush=True)


async def http(method: str, url: str, body: dict | None = None):
    import aiohttp

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
        async with s.request(method, url, json=body) as r:
            data = await r.json(content_type=None)
            if r.status >= 400:
                raise RuntimeError(f"{url}: {r.status} {data}")
            return data


class Demo:
    def __init__(self, args, speed: Speed):
        self.args, self.speed = args, speed
        self.log = Log()
        self.counts: dict[str, int] = {}
        self.errors = 0
        self.decisions: list[dict] = []
        self.drifted: list[dict] = []
        self.alerts: list[dict] = []
        self.decided = asyncio.Event()  # the rollout ended: rolled back, promoted or failed
        self.done = asyncio.Event()     # traffic and the log stop
        self.model = ""
        self.stable = ""
        self.scenario = getattr(args, "scenario", "canary")
        self.sour = False               # fallback scenario: the promoted candidate's scores have fallen
        self.soured_at = 0.0
        self.fell_back = asyncio.Event()
        self.fallback: dict = {}
        self.scores: dict[str, list[float]] = {}

    # ---- traffic --------------------------------------------------------------------

    async def load(self, port: int, worker: int) -> None:
        import grpc
        from protos import llm_pb2, llm_pb2_grpc

        rng = random.Random(worker)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = llm_pb2_grpc.LLMStub(ch)
            while not self.done.is_set():
                chat = llm_pb2.Chat(messages=[llm_pb2.ChatMessage(role="user", content=rng.choice(PROMPTS))])
                req = llm_pb2.GenerateRequest(
                    model=self.model, chat=chat,
                    sampling=llm_pb2.SamplingParams(max_tokens=self.speed.max_tokens, temperature=0.0),
                    routing_key=f"user-{rng.randrange(1000)}")
                try:
                    r = await stub.Generate(req, timeout=60)
                    self.counts[r.version] = self.counts.get(r.version, 0) + 1
                    if self.scenario == "fallback":  # the user rates the answer
                        mean = 0.2 if self.sour and r.version == self.candidate else 0.8
                        score = min(1.0, max(0.0, rng.gauss(mean, 0.1)))
                        self.scores.setdefault(f"{r.version}{' (after)' if self.sour else ''}", []).append(score)
                        await stub.Feedback(llm_pb2.FeedbackRequest(request_id=r.request_id, model=self.model,
                                                                    score=score), timeout=10)
                except grpc.aio.AioRpcError as e:
                    self.errors += 1
                    if self.errors <= 3:
                        self.log("traffic", f"error: {e.code().name} {e.details()}")
                    await asyncio.sleep(0.5)

    async def report_traffic(self) -> None:
        while not self.done.is_set():
            await asyncio.sleep(10)
            by = ", ".join(f"{v} {n}" for v, n in sorted(self.counts.items()))
            self.log("traffic", f"requests so far: {by or 'none'}; errors {self.errors}")

    # ---- what the loop says ---------------------------------------------------------

    async def follow(self, bootstrap: str, topic: str) -> None:
        from eventbus.consumer import tail
        from protos import events_pb2 as pb

        async for r in tail(bootstrap, topic):
            m = r.message
            if m is None:
                continue
            if topic == topics.SIGNALS and m.drifted and m.model == self.model:
                kind = pb.SignalKind.Name(m.kind).removeprefix("SIGNAL_KIND_").lower()
                p = f", p={m.p_value:.2g}" if m.HasField("p_value") else ""
                self.drifted.append({"version": m.version, "detector": m.detector, "feature": m.feature,
                                     "statistic": m.statistic, "kind": kind})
                self.log("signal", f"{m.model}/{m.version}: {m.detector} on {m.feature} drifted "
                                   f"({kind}, statistic {m.statistic:.3g}{p}, window {m.window_size})")
            elif topic == topics.ALERTS:
                state = pb.AlertState.Name(m.state).removeprefix("ALERT_STATE_").lower()
                labels = dict(m.labels)
                self.alerts.append({"rule": m.rule, "state": state, "labels": labels,
                                    "time": m.time.ToNanoseconds() / 1e9})
                self.log("alert", f"{m.rule} {state} for {labels.get('model', '?')}/{labels.get('version', '?')}: "
                                  f"{m.annotations.get('summary', '')}")
            elif topic == topics.ROLLOUT and m.model == self.model:
                phase = pb.RolloutPhase.Name(m.phase).removeprefix("ROLLOUT_PHASE_").lower()
                if phase == "rolled_back" and "failed" in m.reason.split(":")[0]:
                    phase = "failed"
                weights = {w.version: w.weight for w in m.weights}
                self.decisions.append({"phase": phase, "step": m.step, "weights": weights, "reason": m.reason,
                                       "generation": m.generation, "stable": m.stable_version,
                                       "candidate": m.candidate_version})
                self.log("rollout", f"generation {m.generation}: {phase}, step {m.step}, weights "
                                    + ", ".join(f"{v} {w:.0%}" for v, w in weights.items())
                                    + (f"\n{'':19}{m.reason}" if m.reason else ""))
                if phase in END_PHASES and m.candidate_version in ("", self.candidate) and self.started:
                    self.decided.set()
                if self.sour and phase == "rolled_back" and m.reason.startswith("fallback"):
                    self.fallback = {"reason": m.reason, "time": m.time.ToNanoseconds() / 1e9,
                                     "after_sour": round(time.monotonic() - self.soured_at, 1)}
                    self.fell_back.set()

    # ---- the run --------------------------------------------------------------------

    async def run(self) -> int:
        from inference.api.options import EventOptions, ServerOptions
        from inference.api.server import InferenceServer
        from protos import llm_pb2, llm_pb2_grpc
        import grpc

        a, sp = self.args, self.speed
        self.started = False
        cand_version, system_prompt = CANDIDATES["good" if self.scenario == "fallback" else a.candidate]
        self.candidate = cand_version
        work = Path(tempfile.mkdtemp(prefix="vigil-demo-"))
        log = self.log
        broker = EmbeddedBroker(port=0)
        await asyncio.to_thread(broker.start)
        bootstrap = broker.bootstrap_servers
        log("stack", f"embedded Kafka broker on {bootstrap}")
        rollout_port, alerting_port = free_port(), free_port()
        w = str(sp.window)
        extra = {
            "process": ["--ks-window", w, "--psi-window", w, "--chi2-window", w,
                        "--psi-threshold", str(sp.psi_threshold), "--signal-every",
                        str(sp.signal_every), "--quality-window", str(sp.signal_every),
                        "--compare-window", w, "--compare-every", str(sp.compare_every),
                        "--compare-min", str(sp.compare_every), "--compare-alpha", str(sp.compare_alpha),
                        "--checkpoint-interval", "2", "--session-timeout-ms", "6000"],
            "alerting": ["--rules", str(demo_rules(work, sp.alert_for)), "--snapshot-interval", "2"],
            "rollout": ["--tick", "0.5", "--default-min-requests", str(sp.min_requests),
                        "--default-interval", str(sp.interval), "--outbox-dir", str(work / "rollout-outbox")],
        }
        if self.scenario == "fallback":
            policy = work / "policy.yml"
            default = (Path(__file__).resolve().parent.parent / "rollout" / "default_policy.yml").read_text()
            policy.write_text(default.rstrip() + "\n" + FALLBACK_POLICY.split("rules:\n", 1)[1])
            extra["rollout"] += ["--policy", str(policy)]
            extra["process"] += ["--score-every", "10", "--score-window", "50"]
        children = stack.services(bootstrap, -1, alerting_port, rollout_port, set(), extra)
        server = None
        tasks: list[asyncio.Task] = []
        try:
            for s in children:
                await stack.start(s)
            server = InferenceServer(ServerOptions(
                port=0, metrics_port=-1, model=a.model, version="1", quantize="int4", group_size=32,
                threads=a.threads, events=EventOptions(bootstrap_servers=bootstrap,
                                                       outbox_dir=str(work / "server-outbox"))))
            await server.start()
            stable = next(iter(server.router.all()))
            self.model, self.stable = stable.model, stable.version
            log("stack", f"inference server on 127.0.0.1:{server.port}: {self.model} version {self.stable} "
                         f"({stable.quantize})")
            stack.print_status(children)
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
                t = time.monotonic()
                await llm_pb2_grpc.LLMStub(ch).LoadVersion(llm_pb2.LoadVersionRequest(
                    model=self.model, version=cand_version, source=a.model, quantize="int4",
                    system_prompt=system_prompt), timeout=300)
            log("stack", f"candidate {cand_version} loaded ({'good' if self.scenario == 'fallback' else a.candidate}: "
                         f"{'system prompt ' + repr(system_prompt) if system_prompt else 'same as stable'}) "
                         f"in {time.monotonic() - t:.1f}s")
            for topic in (topics.SIGNALS, topics.ALERTS, topics.ROLLOUT):
                tasks.append(asyncio.create_task(self.follow(bootstrap, topic)))
            tasks += [asyncio.create_task(self.load(server.port, i)) for i in range(sp.concurrency)]
            tasks.append(asyncio.create_task(self.report_traffic()))
            log("traffic", f"{sp.concurrency} concurrent Generate calls, max_tokens {sp.max_tokens}, "
                           f"{len(PROMPTS)} prompts")
            url = f"http://127.0.0.1:{rollout_port}"
            deadline = time.monotonic() + a.timeout
            await self._wait_leader(url, deadline)
            await asyncio.sleep(2)  # a little stable traffic first
            body = {"model": self.model, "candidate": cand_version, "stable": self.stable, "strategy": "canary",
                    "steps": [float(x) for x in sp.steps.split(",")], "min_requests": sp.min_requests,
                    "interval": sp.interval, "thresholds": {"min_samples": sp.min_samples, "latency_ratio": sp.latency_ratio},
                    # a slow or busy machine serves the step's sample later, not never: the canary
                    # waits for it up to the demo's own timeout instead of pausing as inconclusive
                    "inconclusive_limit": math.ceil(a.timeout / sp.interval) + 1}
            r = await http("POST", f"{url}/api/start", body)
            self.started = True
            log("rollout", f"started a canary of {cand_version} (steps {sp.steps} percent, at least "
                           f"{sp.min_requests} candidate requests and {sp.interval:g}s per step): {r.get('reason', '')}")
            try:
                if self.scenario == "fallback":  # the operator promotes once the first step has passed
                    await asyncio.wait_for(self.first_step_passed(), max(1.0, deadline - time.monotonic()))
                    if not self.decided.is_set():
                        r = await http("POST", f"{url}/api/promote", {"model": self.model})
                        log("rollout", f"the operator promotes {cand_version} after its first step passed: "
                                       f"{r.get('reason', '')}")
                await asyncio.wait_for(self.decided.wait(), max(1.0, deadline - time.monotonic()))
                if self.scenario == "fallback" and self.decisions and self.decisions[-1]["phase"] == "promoted":
                    self.soured_at, self.sour = time.monotonic(), True
                    log("traffic", f"{cand_version} is promoted; from now on its users rate its answers about 0.2 "
                                   f"instead of 0.8 (Feedback scores)")
                    await asyncio.wait_for(self.fell_back.wait(), max(1.0, deadline - time.monotonic()))
                seconds = time.monotonic() - log.t0
                if a.linger > 0:
                    log("stack", f"following the loop for {a.linger:g}s more")
                    await asyncio.sleep(a.linger)
            except asyncio.TimeoutError:
                seconds = time.monotonic() - log.t0
            self.done.set()
            history = await http("POST", f"{url}/api/history", {"model": self.model})
            status = await http("POST", f"{url}/api/status", {"model": self.model})
            self.actions = await http("POST", f"{url}/api/actions", {"model": self.model})
            return self.summary(history, status, seconds)
        finally:
            self.done.set()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if server is not None:
                await server.stop()
            await stack.stop(children)
            await asyncio.to_thread(broker.stop)

    async def first_step_passed(self) -> None:
        while not self.decided.is_set() and not any(d["step"] >= 1 for d in self.decisions):
            await asyncio.sleep(0.2)

    async def _wait_leader(self, url: str, deadline: float) -> None:
        while True:
            with contextlib.suppress(Exception):
                if (await http("GET", f"{url}/healthz")).get("leader"):
                    return
            if time.monotonic() > deadline:
                raise RuntimeError("the rollout controller did not become leader")
            await asyncio.sleep(0.5)

    def summary(self, history, status, seconds: float) -> int:
        last = self.decisions[-1] if self.decisions else {}
        outcome = last.get("phase") if last.get("phase") in END_PHASES else "none"
        steps = sorted({d["step"] for d in self.decisions if d["phase"] in ("canary", "progressing")})
        s = {"candidate": self.args.candidate, "version": self.candidate, "stable": self.stable,
             "outcome": outcome, "reason": last.get("reason", ""), "seconds": round(seconds, 1),
             "requests": dict(self.counts), "errors": self.errors, "steps_seen": steps,
             "decisions": self.decisions, "drifted_signals": self.drifted, "alerts": self.alerts,
             "history": history, "status": status, "scenario": self.scenario,
             "actions": getattr(self, "actions", []), "fallback": self.fallback}
        if self.scenario == "fallback":
            fired = [x for x in self.alerts if x["rule"] == "FeedbackScoreShift" and x["state"] == "firing"
                     and x["labels"].get("version") == self.candidate]
            if self.fallback and fired:
                s["fallback"]["alert_to_fallback"] = round(self.fallback["time"] - fired[0]["time"], 3)
            s["outcome"] = outcome = "fallback" if self.fallback else "none"
        print("\n=== vigil demo summary ===", flush=True)
        print(f"candidate {self.candidate} ({self.args.candidate}) against stable {self.stable}: {outcome} "
              f"after {seconds:.0f}s", flush=True)
        print(f"requests: {', '.join(f'{v} {n}' for v, n in sorted(self.counts.items()))}; errors {self.errors}")
        feats = sorted({f"{d['detector']}/{d['feature']} ({d['version']})" for d in self.drifted})
        print(f"drifted signals: {', '.join(feats) or 'none'}")
        fired = sorted({f"{x['rule']} ({x['labels'].get('version', '?')})" for x in self.alerts if x['state'] == 'firing'})
        print(f"alerts fired: {', '.join(fired) or 'none'}")
        for h in history if isinstance(history, list) else []:
            print(f"history: {h.get('action')} -> {h.get('to')} (step {h.get('step')}): {h.get('reason')}")
        for x in s["actions"]:
            print(f"action: {x['action']} {x['outcome']} ({x['policy']}): {x['reason']}")
        if self.scenario == "fallback":
            means = ", ".join(f"{v} {sum(x) / len(x):.2f} over {len(x)}" for v, x in sorted(self.scores.items()))
            print(f"feedback scores: {means}")
            if self.fallback:
                f = self.fallback
                print(f"fallback {f['after_sour']:.1f}s after the scores fell"
                      + (f", {f['alert_to_fallback']:.2f}s after the alert" if "alert_to_fallback" in f else "")
                      + f": {f['reason']}", flush=True)
        if self.args.summary_json:
            Path(self.args.summary_json).write_text(json.dumps(s, indent=1, default=str))
        if outcome == "none":
            print(f"no fallback after the promotion within {self.args.timeout:g}s" if self.scenario == "fallback"
                  else f"neither a rollback nor a promotion within {self.args.timeout:g}s", flush=True)
            return 1
        return 0


def run(args) -> int:
    demo = Demo(args, FAST if args.fast else Speed())
    try:
        return asyncio.run(demo.run())
    except KeyboardInterrupt:
        return 130
    except (OSError, RuntimeError, ValueError) as exc:
        print(f"vigil demo: {exc}", file=sys.stderr)
        return 2
