"""API keys: the key file and its errors, bearer tokens, who may call what, the tenant in
every event, key file reloads, `vigil keys`, and secrets kept out of logs, events and
metrics. Over real gRPC, against a tiny random Llama."""

from __future__ import annotations

import json
import logging
import re
import time
import urllib.request
import uuid

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from tritonclient.utils import InferenceServerException

from eventbus.apikeys import AuthError, AuthOptions, KeyFileError, bearer_token, hash_secret, parse_keys
from inference.edge.auth import needs_admin
from inference.api.events import INFERENCE_TOPIC
from inference.api.options import ServerOptions
from inference.api.server import InferenceServer
from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc, llm_pb2, llm_pb2_grpc
from tests.helpers.waiting import wait_until

USER_SECRET = "vgk_user-" + "u" * 40
ADMIN_SECRET = "vgk_admin-" + "a" * 40
OLD_SECRET = "vgk_old-" + "o" * 40
LATE_SECRET = "vgk_late-" + "l" * 40


def entry(name: str, tenant: str, secret: str, **extra) -> str:
    lines = [f"- name: {name}", f"  tenant: {tenant}", f"  sha256: {hash_secret(secret)}"]
    lines += [f"  {k}: {v}" for k, v in extra.items()]
    return "\n".join(lines) + "\n"


KEYS = (entry("user", "acme", USER_SECRET) + entry("ops", "platform", ADMIN_SECRET, admin="true")
        + entry("old", "acme", OLD_SECRET, expires="2020-01-01T00:00:00Z"))


def bearer(secret: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {secret}")]


# -- the key file ----------------------------------------------------------------------


def key_error(text: str) -> str:
    with pytest.raises(KeyFileError) as info:
        parse_keys(text, "keys.yml")
    return str(info.value)


def test_key_file_forms():
    keys = parse_keys(KEYS, "keys.yml")
    assert {k.name: (k.tenant, k.admin) for k in keys.values()} == {
        "user": ("acme", False), "ops": ("platform", True), "old": ("acme", False)}
    assert keys[hash_secret(USER_SECRET)].line == 1
    # a mapping with `keys`, and JSON (which YAML reads)
    assert len(parse_keys("keys:\n" + KEYS)) == 3
    as_json = json.dumps({"keys": [{"name": "j", "tenant": "t", "sha256": hash_secret("s" * 20),
                                    "requests_per_second": 5, "max_streams": 2}]})
    (k,) = parse_keys(as_json).values()
    assert (k.limits.requests_per_second, k.limits.max_streams, k.limits.request_burst) == (5.0, 2, 5.0)
    assert parse_keys("") == {} and parse_keys("keys:\n") == {}
    assert "sha256" not in repr(k) and hash_secret("s" * 20) not in repr(k)


@pytest.mark.parametrize("text, expected", [
    (KEYS + entry("user", "other", "vgk_different-secret-xxxxxxxx"),
     "keys.yml:12: entry 4: name: 'user' is already the name of the entry on line 1"),
    (KEYS + entry("twin", "acme", USER_SECRET),
     "keys.yml:12: entry 4 ('twin'): sha256: the same secret as 'user' on line 1"),
    (entry("a", "t", USER_SECRET) + "  tenant: again\n", "keys.yml:1: entry 1: tenant: given twice (line 4)"),
    ("- name: a\n  sha256: " + hash_secret("x") + "\n", "keys.yml:1: entry 1: tenant: missing"),
    (entry("a", "t", USER_SECRET).replace(hash_secret(USER_SECRET), USER_SECRET),
     "keys.yml:1: entry 1 ('a'): sha256: must be 64 hex digits (the SHA-256 of the secret, never the secret itself)"),
    (entry("a b", "t", USER_SECRET), "keys.yml:1: entry 1: name: 'a b' must be 1 to 64 letters"),
    (entry("a", "t", USER_SECRET, requests_per_second=0), "keys.yml:1: entry 1 ('a'): requests_per_second: 0 "
                                                          "must be above 0 (leave the field out for no limit)"),
    (entry("a", "t", USER_SECRET, tokens_per_minute=-5), "tokens_per_minute: -5 must be above 0"),
    (entry("a", "t", USER_SECRET, max_streams=0), "max_streams: 0 must be above 0"),
    (entry("a", "t", USER_SECRET, max_streams=1.5), "max_streams: 1.5 is not a whole number"),
    (entry("a", "t", USER_SECRET, requests_per_second="fast"), "requests_per_second: 'fast' is not a number"),
    (entry("a", "t", USER_SECRET, requests_per_second=".nan"), "requests_per_second: nan is not finite"),
    (entry("a", "t", USER_SECRET, burst=3), "burst: needs requests_per_second"),
    (entry("a", "t", USER_SECRET, admin="maybe"), "admin: 'maybe' is not true or false"),
    (entry("a", "t", USER_SECRET, rps=5), "keys.yml:1: entry 1: rps: unknown field (expected admin, burst"),
    (entry("a", "t", USER_SECRET, expires="soon"), "expires: 'soon' is not an ISO 8601 date or time"),
    ("- just a string\n", "keys.yml:1: entry 1: expected a mapping with name, tenant and sha256"),
    ("users:\n  - name: a\n", "keys.yml:1: the top level is a list of keys or a mapping with only a `keys` list"),
    ("- name: a\n  tenant: [x\n", "keys.yml:3: not valid YAML"),
    ("keys: 5\n", "keys.yml:1: keys: expected a list of entries"),
    (entry("a", "t", USER_SECRET, expires="2027-13-01"), "keys.yml: line 4: month must be in 1..12"),
    ("- ? [x, y]\n  : 1\n", "keys.yml: line 1: ['x', 'y'] is not a field name"),
    (entry("a", "t", USER_SECRET, requests_per_second=10 ** 400), "requests_per_second: 1000"),
    (entry("a\\n", "t", USER_SECRET).replace("name: a\\n", 'name: "a\\n"'), "name: 'a\\n' must be 1 to 64"),
    (entry("a", "t", USER_SECRET).replace(hash_secret(USER_SECRET), f'"{hash_secret(USER_SECRET)}\\n"'),
     "sha256: must be 64 hex digits"),
])
def test_bad_key_files_name_the_line_and_field(text, expected):
    assert key_error(text).startswith(expected) or expected in key_error(text), key_error(text)


def test_bearer_token_parsing():
    assert bearer_token([("authorization", "Bearer abc")]) == "abc"
    assert bearer_token([("x", "y"), ("authorization", "bearer   abc ")]) == "abc"
    cases = {
        (): ("missing", "authorization: missing"),
        (("authorization", "Basic dXNlcjpwdw=="),): ("malformed", "authorization: expected the Bearer scheme"),
        (("authorization", "Bearer"),): ("malformed", "authorization: the bearer token is empty"),
        (("authorization", "Bearer a b"),): ("malformed", "authorization: malformed bearer token"),
        (("authorization", "Bearer " + "x" * 5000),): ("malformed", "authorization: malformed bearer token"),
        (("authorization", "Bearer a"), ("authorization", "Bearer b")): ("malformed", "given more than once"),
    }
    for metadata, (reason, message) in cases.items():
        with pytest.raises(AuthError) as info:
            bearer_token(metadata)
        assert (info.value.code, info.value.reason) == ("unauthenticated", reason)
        assert str(info.value).startswith(message) or message in str(info.value)
        assert "dXNlcjpwdw" not in str(info.value)


def test_admin_methods_are_deny_by_default():
    for m in ("/vigil.v1.LLM/LoadVersion", "/vigil.v1.LLM/UnloadVersion", "/vigil.v1.LLM/SetTraffic",
              "/inference.GRPCInferenceService/RepositoryModelLoad",
              "/inference.GRPCInferenceService/RepositoryModelUnload", "/vigil.v1.LLM/SomethingNew"):
        assert needs_admin(m), m
    for m in ("/vigil.v1.LLM/Generate", "/vigil.v1.LLM/ListVersions", "/inference.GRPCInferenceService/ModelInfer",
              "/grpc.health.v1.Health/Check", "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"):
        assert not needs_admin(m), m


# -- over gRPC -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("auth") / "keys.yml"
    path.write_text(KEYS)
    return path


@pytest.fixture(scope="module")
def server(start_server, tiny_llama, keys_file):
    return start_server(model=str(tiny_llama), model_name="tiny", quantize="none",
                        auth=AuthOptions(keys_file=str(keys_file), reload_s=0.05))


@pytest.fixture(scope="module")
def llm(server):
    with grpc.insecure_channel(server.address) as ch:
        yield llm_pb2_grpc.LLMStub(ch)


@pytest.fixture(scope="module")
def kserve(server):
    with grpc.insecure_channel(server.address) as ch:
        yield grpc_service_pb2_grpc.GRPCInferenceServiceStub(ch)


def rid() -> str:
    return f"auth-{uuid.uuid4()}"


def gen_request(request_id: str = "") -> llm_pb2.GenerateRequest:
    return llm_pb2.GenerateRequest(model="tiny", prompt="hello there", request_id=request_id or rid(),
                                   sampling=llm_pb2.SamplingParams(max_tokens=3))


def code_of(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


def events(sink, request_id: str, timeout: float = 5.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [e for e in sink.events(INFERENCE_TOPIC) if e["request_id"] == request_id]
        if found:
            return found
        time.sleep(0.01)
    return []


def test_calls_without_a_good_key_are_unauthenticated(llm):
    cases = {
        None: "authorization: missing",
        "Basic xyz": "authorization: expected the Bearer scheme",
        "Bearer ": "authorization: the bearer token is empty",
        "Bearer not-a-key-at-all": "authorization: unknown API key",
        f"Bearer {OLD_SECRET}": "authorization: API key 'old' expired at 2020-01-01T00:00:00Z",
    }
    for value, message in cases.items():
        with pytest.raises(grpc.RpcError) as info:
            llm.Generate(gen_request(), metadata=[("authorization", value)] if value else None, timeout=30)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert info.value.details().startswith(message), info.value.details()
        assert ("www-authenticate", 'Bearer realm="vigil"') in tuple(info.value.trailing_metadata())
    # and the server goes on serving good keys
    assert llm.Generate(gen_request(), metadata=bearer(USER_SECRET), timeout=30).completion_tokens == 3


def test_streams_and_kserve_need_a_key_too(llm, kserve):
    assert code_of(lambda: list(llm.GenerateStream(gen_request(), timeout=30)))[0] == grpc.StatusCode.UNAUTHENTICATED
    assert code_of(lambda: kserve.ModelMetadata(pb.ModelMetadataRequest(name="tiny"), timeout=30))[0] \
        == grpc.StatusCode.UNAUTHENTICATED
    assert code_of(lambda: list(kserve.ModelStreamInfer(iter([pb.ModelInferRequest(model_name="tiny")]),
                                                        timeout=30)))[0] == grpc.StatusCode.UNAUTHENTICATED
    chunks = list(llm.GenerateStream(gen_request(), metadata=bearer(USER_SECRET), timeout=30))
    assert chunks[-1].final


def test_health_reflection_and_liveness_stay_open(server, kserve):
    with grpc.insecure_channel(server.address) as ch:
        check = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert check.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        (answer,) = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                              timeout=10)
        assert "vigil.v1.LLM" in {s.name for s in answer.list_services_response.service}
    assert kserve.ServerLive(pb.ServerLiveRequest(), timeout=10).live
    assert kserve.ServerReady(pb.ServerReadyRequest(), timeout=10).ready


def test_admin_calls_need_the_admin_right(server, llm, kserve, tiny_llama):
    user = bearer(USER_SECRET)
    calls = {
        "LoadVersion": lambda md: llm.LoadVersion(llm_pb2.LoadVersionRequest(
            model="tiny", version="2", source=str(tiny_llama), quantize="none"), metadata=md, timeout=120),
        "UnloadVersion": lambda md: llm.UnloadVersion(llm_pb2.UnloadVersionRequest(model="tiny", version="2"),
                                                      metadata=md, timeout=60),
        "SetTraffic": lambda md: llm.SetTraffic(llm_pb2.SetTrafficRequest(model="tiny", weights={"1": 1.0}),
                                                metadata=md, timeout=30),
        "RepositoryModelLoad": lambda md: kserve.RepositoryModelLoad(
            pb.RepositoryModelLoadRequest(model_name="tiny"), metadata=md, timeout=60),
        "RepositoryModelUnload": lambda md: kserve.RepositoryModelUnload(
            pb.RepositoryModelUnloadRequest(model_name="tiny"), metadata=md, timeout=60),
    }
    for name, call in calls.items():
        code, details = code_of(lambda: call(user))
        assert code == grpc.StatusCode.PERMISSION_DENIED, (name, code)
        assert details == f"{name}: API key 'user' has no admin right"
        assert code_of(lambda: call(None))[0] == grpc.StatusCode.UNAUTHENTICATED
    # read-only calls are open to any key
    assert [v.version for v in llm.ListVersions(llm_pb2.ListVersionsRequest(), metadata=user).versions] == ["1"]
    # the admin key may
    admin = bearer(ADMIN_SECRET)
    calls["LoadVersion"](admin)
    calls["SetTraffic"](admin)
    calls["UnloadVersion"](admin)
    assert [v.version for v in llm.ListVersions(llm_pb2.ListVersionsRequest(), metadata=admin).versions] == ["1"]
    text = urllib.request.urlopen(server.metrics_url).read().decode()
    assert 'vigil_key_permission_denied_total{key="user",method="SetTraffic",tenant="acme"} 1.0' in text


def test_the_tenant_is_in_every_event(server, llm, kserve):
    ids = {"gen": rid(), "stream": rid(), "classify": rid(), "infer": rid(), "admin": rid(), "bad": rid()}
    llm.Generate(gen_request(ids["gen"]), metadata=bearer(USER_SECRET), timeout=30)
    list(llm.GenerateStream(gen_request(ids["stream"]), metadata=bearer(USER_SECRET), timeout=30))
    llm.Classify(llm_pb2.ClassifyRequest(model="tiny", text="yes or no?", labels=["yes", "no"],
                                         request_id=ids["classify"]), metadata=bearer(USER_SECRET), timeout=30)
    llm.Generate(gen_request(ids["admin"]), metadata=bearer(ADMIN_SECRET), timeout=30)
    with pytest.raises(grpc.RpcError):  # a failed request is recorded with its tenant too
        llm.Generate(llm_pb2.GenerateRequest(model="tiny", request_id=ids["bad"]), metadata=bearer(USER_SECRET))
    req = pb.ModelInferRequest(model_name="tiny", id=ids["infer"], inputs=[pb.ModelInferRequest.InferInputTensor(
        name="text_input", datatype="BYTES", shape=[1], contents=pb.InferTensorContents(bytes_contents=[b"hi"]))])
    kserve.ModelInfer(req, metadata=bearer(USER_SECRET), timeout=30)
    expected = {"gen": "acme", "stream": "acme", "classify": "acme", "infer": "acme", "admin": "platform",
                "bad": "acme"}
    for what, request_id in ids.items():
        found = events(server.sink, request_id)
        assert len(found) == 1, what
        assert found[0]["tenant"] == expected[what], what


def test_tritonclient_sends_the_key_as_a_header(server):
    client = tc.InferenceServerClient(server.address)
    try:
        text = tc.InferInput("text_input", [1], "BYTES")
        text.set_data_from_numpy(np.array([b"hello"], dtype=np.object_))
        result = client.infer("tiny", [text], headers={"authorization": f"Bearer {USER_SECRET}"})
        assert result.as_numpy("text_output") is not None
        with pytest.raises(InferenceServerException, match="UNAUTHENTICATED"):
            client.infer("tiny", [text])
        assert client.is_server_live()
    finally:
        client.close()


def test_secrets_stay_out_of_logs_events_and_metrics(server, llm, caplog):
    guess = "vgk_guessed-" + "g" * 30
    with caplog.at_level(logging.DEBUG):
        request_id = rid()
        llm.Generate(gen_request(request_id), metadata=bearer(USER_SECRET), timeout=30)
        code_of(lambda: llm.Generate(gen_request(), metadata=bearer(guess), timeout=30))
    texts = [r.getMessage() for r in caplog.records]
    dumped = json.dumps(server.sink.events(INFERENCE_TOPIC))
    metrics = urllib.request.urlopen(server.metrics_url).read().decode()
    for secret in (USER_SECRET, guess, ADMIN_SECRET):
        for where, text in (("log", "\n".join(texts)), ("events", dumped), ("metrics", metrics)):
            assert secret not in text, where
            assert hash_secret(secret) not in text, where
    assert 'vigil_auth_failures_total{reason="unknown"}' in metrics


def test_key_file_reload_adds_keys_and_a_bad_file_keeps_the_keys(server, llm, keys_file, caplog):
    def accepted(secret: str) -> bool:  # the file is looked at every 0.05 s, on the call path
        try:
            llm.Generate(gen_request(), metadata=bearer(secret), timeout=30)
            return True
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.UNAUTHENTICATED, e
            return False

    def refused_reloads() -> float:
        text = urllib.request.urlopen(server.metrics_url).read().decode()
        m = re.search(r'^vigil_auth_key_file_reloads_total\{result="error"\} (\S+)$', text, re.M)
        return float(m.group(1)) if m else 0.0

    assert not accepted(LATE_SECRET)
    keys_file.write_text(KEYS + entry("late", "newco", LATE_SECRET))
    wait_until(lambda: accepted(LATE_SECRET), 10, "the added key accepted")
    before = refused_reloads()
    with caplog.at_level(logging.ERROR, logger="eventbus.apikeys"):
        keys_file.write_text(KEYS + entry("late", "newco", LATE_SECRET) + entry("late", "dup", "vgk_" + "d" * 40))
        wait_until(lambda: accepted(USER_SECRET) and refused_reloads() > before, 10, "the bad file refused")
        assert accepted(LATE_SECRET)  # still in force
    assert any("not reloaded" in r.getMessage() and "'late' is already the name" in r.getMessage()
               for r in caplog.records)
    keys_file.write_text(KEYS)  # a removed key is refused from the next check on
    wait_until(lambda: not accepted(LATE_SECRET), 10, "the removed key refused")


def test_no_key_file_means_open_with_an_empty_tenant(start_server, tiny_llama):
    s = start_server(model=str(tiny_llama), model_name="tiny", quantize="none")
    with grpc.insecure_channel(s.address) as ch:
        request_id = rid()
        llm_pb2_grpc.LLMStub(ch).Generate(gen_request(request_id), timeout=30)
    assert events(s.sink, request_id)[0]["tenant"] == ""
    assert s.server.edge is None


async def test_a_bad_key_file_stops_start_up_before_the_model_loads(tmp_path):
    bad = tmp_path / "keys.yml"
    bad.write_text(entry("a", "t", USER_SECRET, requests_per_second=-1))
    o = ServerOptions(model="/nonexistent/model", port=0, metrics_port=-1, auth=AuthOptions(keys_file=str(bad)))
    with pytest.raises(KeyFileError, match=r"keys.yml:1: entry 1 \('a'\): requests_per_second: -1 must be above 0"):
        await InferenceServer(o).start()
    o.auth.keys_file = str(tmp_path / "missing.yml")
    with pytest.raises(KeyFileError, match="missing.yml: cannot read the key file"):
        await InferenceServer(o).start()


# -- vigil keys ------------------------------------------------------------------------


def test_vigil_keys_add_prints_the_entry_and_the_secret_once(tmp_path, capsys, monkeypatch):
    from vigil.cli import main

    path = tmp_path / "keys.yml"
    assert main(["keys", "add", "--name", "web", "--tenant", "acme", "--requests-per-second", "20",
                 "--tokens-per-minute", "60000", "--max-streams", "4"]) == 0
    out, err = capsys.readouterr()
    secret = err.strip().splitlines()[-1]
    assert secret.startswith("vgk_") and len(secret) > 40 and secret not in out
    assert main(["keys", "add", "--name", "root", "--tenant", "ops", "--admin"]) == 0
    out2, _ = capsys.readouterr()
    path.write_text(out + out2)  # as `>> keys.yml` does
    keys = parse_keys(path.read_text())
    web = keys[hash_secret(secret)]
    assert (web.name, web.tenant, web.admin, web.limits.requests_per_second, web.limits.max_streams) == \
        ("web", "acme", False, 20.0, 4)
    assert main(["keys", "check", str(path)]) == 0
    assert "2 keys, ok" in capsys.readouterr().out
    path.write_text(out + out)  # the same entry twice
    assert main(["keys", "check", str(path)]) == 1
    assert "'web' is already the name of the entry on line 1" in capsys.readouterr().err
    assert main(["keys", "add", "--name", "x", "--tenant", "t", "--requests-per-second", "0"]) == 2
    assert "requests_per_second: 0 must be above 0" in capsys.readouterr().err


def test_cli_security_options_come_from_the_environment(monkeypatch, tmp_path):
    from inference.cli import server_options
    from vigil.cli import build_parser

    monkeypatch.setenv("VIGIL_AUTH_KEYS", str(tmp_path / "k.yml"))
    monkeypatch.setenv("VIGIL_TLS_CERT", "/c.pem")
    monkeypatch.setenv("VIGIL_TLS_KEY", "/k.pem")
    monkeypatch.setenv("VIGIL_TLS_CLIENT_CA", "/ca.pem")
    o = server_options(build_parser().parse_args(["serve"]))
    assert o.auth.keys_file == str(tmp_path / "k.yml")
    assert (o.tls.cert_file, o.tls.key_file, o.tls.client_ca_file) == ("/c.pem", "/k.pem", "/ca.pem")


def test_cli_reports_a_bad_key_file(tmp_path, capsys):
    from vigil.cli import main

    bad = tmp_path / "keys.yml"
    bad.write_text(entry("a", "t", USER_SECRET) + entry("a", "t", "vgk_" + "z" * 40))
    rc = main(["serve", "--model", "/nonexistent/model", "--port", "0", "--metrics-port", "-1",
               "--auth-keys", str(bad)])
    assert rc == 2
    assert f"vigil serve: {bad}:4: entry 2: name: 'a' is already the name" in capsys.readouterr().err
