"""Vigil alerting: signals in, grouped, throttled notifications out.

What this folder does: rules over detector signals (rules.py, YAML shaped like Prometheus
alerting rules, with the `check-rules` validator), the alert state machine (engine.py:
inactive, pending, firing, resolved; for and keep_firing_for; Alertmanager fingerprints),
Alertmanager's notification model (config.py routing tree and receivers; dispatch.py
grouping, deduplication through the notification log in nflog.py, inhibition, silences in
silences.py, throttling), and the sinks (sinks.py: signed Alertmanager-format webhooks with
retries and per-receiver queues; Alertmanager's v2 API). core.py runs them on one asyncio
loop with an injectable clock (clock.py); admin.py is the HTTP admin API
(Alertmanager-compatible silences); cli.py holds the command-line entry points.

What it may touch: nothing of the other services. Only service.py (`vigil alerting`) imports
eventbus/ and protos/: it converts vigil.signals records into `Signal`, publishes
`StateChange` records to vigil.alerts, and persists `AlertingCore.snapshot()`, the
notification log and silences on the compacted vigil.alerting.state topic. The other
modules import no other Vigil package.
Its network traffic is HTTP out to the configured webhooks and Alertmanagers, and HTTP in
on the admin port.
"""

from .clock import ManualClock, SystemClock
from .config import Config, config_from_text, load_config
from .core import AlertingCore, core_from_files
from .dispatch import Dispatcher
from .engine import RuleEngine
from .labels import Matcher, fingerprint, fingerprint_hex, parse_matcher
from .nflog import NotificationLog
from .rules import RuleSet, check_files, load_rules, rules_from_text
from .signals import Alert, Notification, Signal, StateChange
from .silences import Silences

__all__ = [
    "Alert", "AlertingCore", "Config", "Dispatcher", "ManualClock", "Matcher", "Notification", "NotificationLog",
    "RuleEngine", "RuleSet", "Signal", "Silences", "StateChange", "SystemClock",
    "check_files", "config_from_text", "core_from_files", "fingerprint", "fingerprint_hex", "load_config",
    "load_rules", "parse_matcher", "rules_from_text",
]
