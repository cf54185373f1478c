"""A version's temperature from vigil.rollout, applied by the server to its label
probabilities (Classify answers and their events), and taken away again."""

from __future__ import annotations

import uuid

import grpc
import pytest
from confluent_kafka import Producer

from eventbus import temperature, topics
from inference.api.options import EventOptions
from protos import events_pb2, llm_pb2, llm_pb2_grpc
from tests.helpers.waiting import wait_until

LABELS = ["dog", "cat", "fox"]


def publish(bootstrap: str, model: str, generation: int, temperatures: dict) -> None:
    state = events_pb2.RolloutState(event_id=f"{model}:{generation}", model=model, stable_version="1",
                                    generation=generation, temperatures=temperatures)
    state.weights.add(version="1", weight=1.0)
    producer = Producer({"bootstrap.servers": bootstrap, "log_level": 3})
    producer.produce(topics.ROLLOUT, value=state.SerializeToString(), key=model)
    producer.flush(10)


def test_the_rollout_temperature_rescales_label_probabilities(start_server, tiny_llama, kafka_broker, tmp_path):
    model = f"recal-{uuid.uuid4().hex[:6]}"
    s = start_server(model=str(tiny_llama), model_name=model, version="1", quantize="none",
                     events=EventOptions(bootstrap_servers=kafka_broker.bootstrap_servers,
                                         outbox_dir=str(tmp_path / "outbox")))
    version = s.server.router.versions[model]["1"]

    def classify() -> list[float]:
        with grpc.insecure_channel(s.address) as ch:
            r = llm_pb2_grpc.LLMStub(ch).Classify(llm_pb2.ClassifyRequest(
                model=model, text="The quick brown fox jumps over the lazy", labels=LABELS), timeout=60)
        return [x.probability for x in r.scores]

    raw = classify()
    publish(kafka_broker.bootstrap_servers, model, 1, {"1": 2.5})
    wait_until(lambda: version.temperature == 2.5, 30, "the follower to apply the temperature")
    scaled = classify()
    assert scaled == pytest.approx(temperature.scale(raw, 2.5), abs=1e-9)
    assert max(scaled) < max(raw) and scaled.index(max(scaled)) == raw.index(max(raw))  # softer, same top label

    publish(kafka_broker.bootstrap_servers, model, 2, {})
    wait_until(lambda: version.temperature == 1.0, 30, "the temperature taken away")
    assert classify() == pytest.approx(raw, abs=1e-9)
