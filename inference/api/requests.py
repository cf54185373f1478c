"""What a front hands the serving layer, and what it gets back: plain data, no protocol in
it. A front translates its messages into these and the outcomes (or `errors`) back.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from inference.api.errors import InvalidArgument
from inference.runtime.engine import Finished, Timing
from inference.runtime.sampling import SamplingParams


@dataclass(frozen=True)
class Call:
    """What every request carries besides its input."""
    method: str                  # names the request in events, metrics, log lines and spans
    request_id: str = ""         # the caller's id for the request; one is made when it is empty
    id_field: str = "request_id"  # what the front calls the request id, in error messages
    metadata: Mapping[str, str] | None = None  # the caller's headers, keys in lower case; None: made by the server
    deadline: float | None = None  # time.monotonic() at which the caller stops waiting
    protocol: str = "grpc"       # the front it came through (grpc, http): a label of the request metrics


@dataclass
class ModelRequest:
    """A request for a model: routed to one of its versions, run on a prompt or a chat."""
    call: Call
    model: str = ""
    version: str = ""      # empty: the router picks one
    routing_key: str = ""  # the same key lands on the same version while the weights stay
    attributes: dict[str, str] = field(default_factory=dict)  # what feature-flag rules match on
    prompt: str = ""
    messages: list[dict[str, str]] | None = None  # a chat ("role", "content"), instead of a prompt
    input_field: str = "prompt"  # the front's names of the input and of an attribute, in error messages
    attribute_field: str = "attributes[{}]"
    invalid: InvalidArgument | None = None  # the front could not translate its message: recorded, then raised


@dataclass
class GenerateRequest(ModelRequest):
    sampling: SamplingParams = field(default_factory=SamplingParams)


@dataclass
class ClassifyRequest(ModelRequest):
    labels: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class FeedbackRequest:
    request_id: str    # of the request the feedback is about
    model: str = ""    # empty: the model that served request_id, if this server remembers it
    version: str = ""
    label: str | None = None
    score: float | None = None
    comment: str = ""


@dataclass(frozen=True)
class Served:
    """Who answered: the request's id, the version that ran it, and the flags that were on."""
    request_id: str
    model: str
    version: str
    flags: tuple[str, ...]


@dataclass(frozen=True)
class Chunk:
    """Text of a streamed generation, as it comes."""
    served: Served
    text: str
    token_ids: list[int]
    logprobs: list[float] = field(default_factory=list)  # of each of token_ids, as sampled


@dataclass(frozen=True)
class Generated:
    served: Served
    finished: Finished


@dataclass(frozen=True)
class LabelScore:
    label: str
    probability: float
    logprob: float


@dataclass(frozen=True)
class Classified:
    served: Served
    scores: list[LabelScore]
    prompt_tokens: int
    timing: Timing

    @property
    def prediction(self) -> str:
        return max(self.scores, key=lambda s: s.probability).label
