"""One log line per request, at INFO, on the logger `inference.requests`.

The line is made from the request's event, so the two always agree: request id,
method, tenant, model, version, route, status (and error), finish reason, the
latencies (queue, first token, total, in seconds), token counts, the trace id (and
span id when traced), flags and shadow_of where set. Prompt and completion text only
with `--log-include-text` (off by default). The fields are the record's `extra`, so
`--log-format json` writes them as one flat JSON object (vigil/logs.py), and
`--log-levels inference.requests=WARNING` turns the lines off.
"""

from __future__ import annotations

import logging

log = logging.getLogger("inference.requests")

FIELDS = ("request_id", "method", "tenant", "model", "version", "route", "status", "error", "finish_reason",
          "queue_seconds", "first_token_seconds", "total_seconds", "prompt_tokens", "completion_tokens",
          "trace_id")
OPTIONAL = ("error", "tenant", "trace_id")  # left out when empty


def log_request(event: dict, span_id: str = "", prompt_text: str | None = None,
                completion_text: str | None = None) -> None:
    if not log.isEnabledFor(logging.INFO):
        return
    fields = {}
    for name in FIELDS:
        value = event.get(name)
        if name in OPTIONAL and not value:
            continue
        if isinstance(value, float):
            value = round(value, 6)
        fields[name] = value
    if span_id:
        fields["span_id"] = span_id
    if event.get("flags"):
        fields["flags"] = list(event["flags"])
    if event.get("shadow_of"):
        fields["shadow_of"] = event["shadow_of"]
    if prompt_text is not None:
        fields["prompt_text"] = prompt_text
    if completion_text is not None:
        fields["completion_text"] = completion_text
    log.info("%s %s/%s %s in %.3f s", event.get("method"), event.get("model") or "-", event.get("version") or "-",
             event.get("status"), event.get("total_seconds") or 0.0, extra=fields)
