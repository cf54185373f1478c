"""The signature of an outgoing webhook: HMAC-SHA256 of the body with a shared secret,
sent as `X-Vigil-Signature: sha256=<hex>`. Alerting signs its notifications with it and
the rollout controller its retrain requests, so a receiver checks both the same way.

>>> verify(b"k", b"{}", sign(b"k", b"{}"))
True
"""

from __future__ import annotations

import hashlib
import hmac

SIGNATURE_HEADER = "X-Vigil-Signature"


def sign(secret: bytes, body: bytes) -> str:
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def verify(secret: bytes, body: bytes, header: str | None) -> bool:
    return header is not None and hmac.compare_digest(sign(secret, body), header)
