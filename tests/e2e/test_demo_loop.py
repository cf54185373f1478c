"""`vigil demo` end to end with the real parts: the embedded broker, `vigil process`,
`vigil alerting` and `vigil rollout` as child processes, the inference server with the
demo model, and a candidate version loaded next to it through LoadVersion."""

from __future__ import annotations

import json
import subprocess
import sys


def run_demo(tmp_path, candidate: str) -> dict:
    out = tmp_path / f"{candidate}.json"
    p = subprocess.run([sys.executable, "-m", "vigil.cli", "demo", "--candidate", candidate,
                        "--timeout", "240", "--summary-json", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    return json.loads(out.read_text())


def test_a_candidate_that_stops_answering_is_rolled_back_with_the_reason(tmp_path, demo_gguf):
    s = run_demo(tmp_path, "bad")
    assert s["outcome"] == "rolled_back", s["reason"]
    assert s["status"]["stable"] == s["stable"]
    [h] = [h for h in s["history"] if h["action"] == "rolled_back"]
    # the step's analysis (confidence) or the alert on the candidate's drift, whichever came first
    assert ("confidence fail" in h["reason"] and "Mann-Whitney" in h["reason"]) \
        or ("alert CandidateDriftsFromStable" in h["reason"] and 'version="2-pirate"' in h["reason"]), h["reason"]
    # the processors saw the candidate drift from stable on the same traffic (which features
    # reach p < 1e-3 within some 30 candidate requests varies from run to run; the longer
    # system prompt always shows in the latencies)
    assert [d for d in s["drifted_signals"] if d["detector"] == "ks_vs_stable" and d["version"] == s["version"]]


def test_a_candidate_like_stable_is_promoted_through_every_step(tmp_path, demo_gguf):
    s = run_demo(tmp_path, "good")
    assert s["outcome"] == "promoted", s["reason"]
    assert not [d for d in s["decisions"] if d["phase"] in ("rolled_back", "failed")]
    assert s["steps_seen"] == [0, 1, 2]
