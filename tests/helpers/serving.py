"""An inference server of the tiny model publishing its events to a broker, and what
tests ask of it: a Generate call, a sample of /metrics, an event decoded."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from inference.api.options import EventOptions
from protos import events_pb2, llm_pb2


TINY = "tiny"


PROMPT = "The quick brown fox"


def inference_event(record) -> events_pb2.InferenceEvent:
    return events_pb2.InferenceEvent.FromString(record.value())


def generate(stub, request_id: str, prompt: str = PROMPT, model: str = TINY, max_tokens: int = 4):
    return stub.Generate(llm_pb2.GenerateRequest(
        model=model, prompt=prompt, request_id=request_id,
        sampling=llm_pb2.SamplingParams(max_tokens=max_tokens, temperature=0)), timeout=60)


def metric(url: str, name: str, **labels) -> float:
    """A sample of the server's /metrics whose labels include `labels`; 0 if absent."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                return sample.value
    return 0.0


def kafka_server(start_server, tiny_llama, tmp_path, bootstrap: str, **events):
    events.setdefault("publish_timeout_ms", 1000)
    events.setdefault("topic_partitions", 3)
    events.setdefault("outbox_dir", str(tmp_path / "outbox"))
    return start_server(model=str(tiny_llama), model_name=TINY, quantize="none",
                        events=EventOptions(bootstrap_servers=bootstrap, **events))
