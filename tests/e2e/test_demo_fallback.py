"""`vigil demo --scenario fallback` end to end with the real parts (the stack of `vigil demo`,
the demo model): a good candidate is promoted, its Feedback scores then fall, and the
controller's response policy puts all traffic back on the previous version."""

from __future__ import annotations

import json
import subprocess
import sys


def test_a_promoted_version_whose_scores_fall_is_put_back_on_the_previous_one(tmp_path, demo_gguf):
    out = tmp_path / "fallback.json"
    p = subprocess.run([sys.executable, "-m", "vigil.cli", "demo", "--scenario", "fallback", "--fast",
                        "--timeout", "400", "--linger", "0", "--summary-json", str(out)],
                       capture_output=True, text=True, timeout=500)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    s = json.loads(out.read_text())
    assert s["outcome"] == "fallback"
    assert s["status"]["stable"] == s["stable"] and s["status"]["weights"] == {s["stable"]: 1.0}
    [h] = [h for h in s["history"] if h["action"] == "fallback"]
    assert "alert FeedbackScoreShift" in h["reason"] and f'version="{s["version"]}"' in h["reason"], h["reason"]
    assert [a for a in s["actions"] if a["action"] == "fallback" and a["outcome"] == "done"]
    print(f"\nfallback {s['fallback']['after_sour']}s after the scores fell, "
          f"{s['fallback'].get('alert_to_fallback')}s after the alert")
