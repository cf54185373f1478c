"""How large each input of a request may be: the one table the serving layer checks every
front's requests against, so that no free-form input reaches logs, events or error
messages unbounded. An input over its limit is an `InvalidArgument` that names the
field and the limit.
"""

from __future__ import annotations

from dataclasses import dataclass

from inference.api.errors import InvalidArgument


@dataclass(frozen=True)
class Limits:
    max_prompt_chars: int = 32_000  # a prompt, or a chat's message contents together
    max_tokens: int = 1024          # the largest max_tokens a request may ask for
    default_max_tokens: int = 128
    max_labels: int = 32            # Classify's candidate labels
    max_label_chars: int = 256      # each label, and Feedback's label
    max_stop: int = 16              # stop strings
    max_stop_chars: int = 256       # each stop string
    max_messages: int = 256         # a chat's messages
    max_id_chars: int = 256         # request_id (KServe: id) and routing_key
    max_name_chars: int = 256       # model and version names
    max_attributes: int = 32        # request attributes for feature-flag rules
    max_attribute_chars: int = 256  # each attribute's name, and its value
    max_comment_chars: int = 4096   # Feedback's comment
    max_json_chars: int = 4096      # KServe's sampling_parameters


def check_chars(field: str, value: str, limit: int) -> None:
    if len(value) > limit:
        raise InvalidArgument(f"{field}: {len(value)} characters, the limit is {limit}")
