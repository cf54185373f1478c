"""The model versions a server holds, and which one serves each request.

Each model has one or more loaded versions and a traffic weight per version. A request
that names a version gets it; otherwise a routing key (a session or user id) is hashed
onto the cumulative weights, so the same key lands on the same version while the
weights stay the same, and a request without a key is placed at random.

A model may also have shadow versions, which get a copy of each routed request (the
serving layer runs it and throws the answer away), and feature flags, evaluated per
request on its routing key and attributes (eventbus/flags.py). `set_rollout` replaces a
model's weights, shadows, flags and stable version in one call on the event loop, so a
request sees either the old set or the new one.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

from eventbus.flags import Flag, bucket, evaluate
from inference.api.errors import NotFound, shown
from inference.runtime.engine import Engine
from inference.runtime.tokenizer import Tokenizer


@dataclass(eq=False)
class ModelVersion:
    model: str
    version: str
    source: str
    quantize: str
    engine: Engine
    tokenizer: Tokenizer
    group_size: int = 32
    system_prompt: str = ""
    loaded_at: float = field(default_factory=time.time)
    temperature: float = 1.0  # of its label probabilities (eventbus/temperature.py), set by the rollout


class Router:
    def __init__(self):
        self.versions: dict[str, dict[str, ModelVersion]] = {}
        self.weights: dict[str, dict[str, float]] = {}
        self.shadows: dict[str, tuple[str, ...]] = {}
        self.stable: dict[str, str] = {}  # model -> the rollout's stable version, where a record named one
        self.flags: dict[str, dict[str, Flag]] = {}

    def add(self, mv: ModelVersion) -> None:
        versions = self.versions.setdefault(mv.model, {})
        if mv.version in versions:
            raise ValueError(f"version: {mv.model} {shown(mv.version)} is already loaded")
        versions[mv.version] = mv
        weights = self.weights.setdefault(mv.model, {})
        weights[mv.version] = 0.0 if weights else 1.0

    def remove(self, model: str, version: str) -> ModelVersion:
        mv = self.get(model, version)
        del self.versions[model][version]
        weights = self.weights[model]
        del weights[version]
        self.shadows[model] = tuple(v for v in self.shadows.get(model, ()) if v != version)
        if not self.versions[model]:
            del self.versions[model], self.weights[model]
            self.shadows.pop(model, None)
            self.flags.pop(model, None)
            self.stable.pop(model, None)
        elif not any(weights.values()):
            weights[next(iter(weights))] = 1.0
        return mv

    def get(self, model: str, version: str) -> ModelVersion:
        if model not in self.versions:
            raise NotFound(f"model: {shown(model)} is not loaded")
        if version not in self.versions[model]:
            raise NotFound(f"version: {model} has no version {shown(version)}")
        return self.versions[model][version]

    def pick(self, model: str, version: str = "", routing_key: str = "") -> ModelVersion:
        if version:
            return self.get(model, version)
        if model not in self.versions:
            raise NotFound(f"model: {shown(model)} is not loaded")
        weights = self.weights[model]
        total = sum(weights.values())
        point = (bucket(model, routing_key) if routing_key else random.random()) * total
        for name in sorted(weights):
            point -= weights[name]
            if point < 0 and weights[name] > 0:
                return self.versions[model][name]
        return self.versions[model][max(weights, key=weights.get)]

    def set_weights(self, model: str, weights: dict[str, float]) -> dict[str, float]:
        if model not in self.versions:
            raise NotFound(f"model: {shown(model)} is not loaded")
        for version, w in weights.items():
            if version not in self.versions[model]:
                raise NotFound(f"weights: {model} has no version {shown(version)}")
            if not (w >= 0.0 and w != float("inf")):
                raise ValueError(f"weights[{shown(version)}]: {w} is not a finite non-negative number")
        if sum(weights.values()) <= 0:
            raise ValueError("weights: at least one version needs a positive weight")
        self.weights[model] = {v: float(weights.get(v, 0.0)) for v in self.versions[model]}
        return dict(self.weights[model])

    def set_rollout(self, model: str, weights: dict[str, float], shadows: list[str],
                    flags: dict[str, Flag], stable: str = "") -> dict[str, float]:
        """Weights, shadow versions, flags and the stable version of a model, replaced together."""
        for version in shadows:
            self.get(model, version)
        new = self.set_weights(model, weights)
        self.shadows[model] = tuple(shadows)
        self.flags[model] = dict(flags)
        self.stable[model] = stable
        return new

    def stable_version(self, model: str) -> str:
        """The version whose requests are route "stable": the rollout's stable version where
        it is loaded here, else the one with the largest weight (the first by name on a tie).
        Never decided by weights alone during a rollout: at a 50 or 75 percent step the
        candidate has as much traffic as stable, or more, and is still the candidate."""
        stable = self.stable.get(model, "")
        if stable in self.versions.get(model, {}):
            return stable
        weights = self.weights[model]
        return min(weights, key=lambda v: (-weights[v], v))

    def flags_on(self, model: str, routing_key: str, attributes: dict[str, str]) -> list[str]:
        flags = self.flags.get(model)
        if not flags:
            return []
        return [name for name, flag in sorted(flags.items()) if evaluate(flag, routing_key, attributes, model)]

    def all(self) -> list[ModelVersion]:
        return [mv for versions in self.versions.values() for mv in versions.values()]
