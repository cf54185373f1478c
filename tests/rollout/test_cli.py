"""`vigil rollout` commands against the in-process controller, and the conversions from
and to the protobuf messages on Kafka."""

from __future__ import annotations

import json

from rollout import Controller, Decision, ManualClock
from rollout.api import LocalApi
from rollout.cli import main


def run(capsys, state, *argv):
    rc = main(["--state", str(state), *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_commands_through_a_state_file(tmp_path, capsys):
    s = tmp_path / "rollout.json"
    assert run(capsys, s, "register", "demo", "v1", "v2", "v3")[0] == 0
    rc, out, _ = run(capsys, s, "start", "demo", "--candidate", "v2", "--steps", "10,50,100")
    assert rc == 0 and "progressing" in out and "v1 90%, v2 10%" in out
    assert "paused" in run(capsys, s, "pause", "demo")[1]
    assert "progressing" in run(capsys, s, "resume", "demo")[1]
    assert "promoted v2 over v1" in run(capsys, s, "promote", "demo")[1]
    run(capsys, s, "start", "demo", "--candidate", "v3", "--strategy", "bluegreen", "--keep-old-for", "60")
    assert "aborted v3" in run(capsys, s, "abort", "demo")[1]
    assert "back to v1 from v2" in run(capsys, s, "undo", "demo")[1]
    rc, out, _ = run(capsys, s, "history", "demo")
    assert rc == 0 and [line.split()[2] for line in out.splitlines()] == ["promoted", "aborted", "undo"]
    st = json.loads(run(capsys, s, "status", "demo", "--json")[1])
    assert st["stable"] == "v1" and st["weights"] == {"v1": 1.0} and st["phase"] == "rolled_back"
    assert "demo: rolled_back" in run(capsys, s, "status")[1]


def test_bad_requests_exit_2_naming_the_field(tmp_path, capsys):
    s = tmp_path / "rollout.json"
    run(capsys, s, "register", "demo", "v1", "v2")
    for argv, field in [(["start", "demo", "--candidate", "v9"], "candidate"),
                        (["start", "demo", "--candidate", "v2", "--steps", "50,25"], "steps"),
                        (["start", "demo", "--candidate", "v2", "--steps", "5,x"], "steps"),
                        (["start", "demo", "--candidate", "v2", "--steps", "5,120"], "steps"),
                        (["start", "demo", "--candidate", "v2", "--interval", "-3"], "interval"),
                        (["start", "nope", "--candidate", "v2"], "model"),
                        (["pause", "demo"], "model")]:
        rc, _, err = run(capsys, s, *argv)
        assert rc == 2 and err.startswith(f"error: {field}: "), (argv, err)


def test_local_api_is_the_controller():
    api = LocalApi(Controller(ManualClock()))
    api.call("register", model="demo", versions=["v1", "v2"])
    d = api.call("start", model="demo", candidate="v2", strategy="shadow")
    assert d["shadow"] == ["v2"] and "state" not in d
    assert api.call("list_models") == ["demo"]


def test_wire_conversions():
    from protos import events_pb2 as pb
    from rollout import wire
    sig = wire.signal(pb.Signal(model="demo", version="v2", kind=pb.SIGNAL_KIND_DRIFT, detector="ks",
                                feature="mean_entropy", statistic=0.3, drifted=True))
    assert (sig.kind, sig.feature, sig.drifted, sig.p_value, sig.reference_version) == \
        ("drift", "mean_entropy", True, None, "")
    cmp = pb.Signal(model="demo", version="v2", kind=pb.SIGNAL_KIND_QUALITY, detector="error_rate_vs_stable",
                    feature="error", statistic=0.1, p_value=0.001, value=0.12, reference_size=60, window_size=50,
                    events=150, labels={"reference_version": "v1"})
    cmp.window_end.FromSeconds(100)
    sig = wire.signal(cmp)
    assert (sig.reference_version, sig.p_value, sig.value, sig.reference_size, sig.window_size, sig.events,
            sig.time) == ("v1", 0.001, 0.12, 60, 50, 150, 100)
    a = wire.alert(pb.Alert(fingerprint="f", rule="R", state=pb.ALERT_STATE_FIRING, labels={"model": "demo"}))
    assert (a.state, a.labels) == ("firing", {"model": "demo"})

    c = Controller(ManualClock())
    c.register("demo", "v1", "v2")
    d = c.start("demo", "v2")
    msg = wire.rollout_state(d)
    assert msg.phase == pb.ROLLOUT_PHASE_CANARY and [(w.version, w.weight) for w in msg.weights] == \
        [("v1", 0.95), ("v2", 0.05)]
    back = wire.decision_dict(pb.RolloutState.FromString(msg.SerializeToString()))
    assert back["weights"] == d.weights and back["generation"] == d.generation
    assert isinstance(Decision.from_dict(d.to_dict()), Decision)
