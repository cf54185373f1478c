"""`vigil process`: options and entry. vigil/cli.py registers it with
``add_parser(subparsers, option)`` and calls ``run(args)``."""

from __future__ import annotations

import asyncio
import sys

from eventbus import security as kafka_security
from eventbus.ports import PortError, port_or_minus_one
from stream_processors.settings import RunnerOptions, Settings


def add_parser(subparsers, option):
    p = subparsers.add_parser(
        "process", help="run a stream processor (consumer group) over the event topics",
        description="Consume vigil.inference.events and vigil.feedback in a consumer group, run drift, "
                    "calibration, quality and latency detectors per model version, compare each candidate "
                    "version with the stable one, and publish vigil.signals. "
                    "Start more processes with the same group id to spread the partitions.")
    d, s = RunnerOptions(), Settings()
    g = p.add_argument_group("kafka")
    option(g, "--bootstrap-servers", default=d.bootstrap_servers, help="Kafka brokers, HOST:PORT[,HOST:PORT...]")
    option(g, "--group-id", default=d.group_id, help="consumer group; also names the checkpoints")
    option(g, "--checkpoint-interval", type=float, default=d.checkpoint_interval,
           help="seconds between checkpoints of state and offsets to vigil.checkpoints")
    option(g, "--max-records", type=int, default=d.max_records, help="records per fetch")
    option(g, "--session-timeout-ms", type=int, default=d.session_timeout_ms,
           help="consumer group session timeout: how soon a dead processor's partitions move")
    option(g, "--metrics-host", default=d.metrics_host, help="address of the Prometheus metrics endpoint")
    option(g, "--metrics-port", type=port_or_minus_one, default=d.metrics_port,
           help="Prometheus metrics port; 0 picks a free port, -1 turns metrics off")
    kafka_security.add_options(p, option)  # --kafka-sasl-*, --kafka-ssl-*, --kafka-security-protocol
    g = p.add_argument_group("detectors")
    option(g, "--ks-window", type=int, default=s.ks_window, help="KS reference and sliding window size")
    option(g, "--ks-alpha", type=float, default=s.ks_alpha, help="KS significance level, per update")
    option(g, "--psi-window", type=int, default=s.psi_window, help="PSI reference and window size")
    option(g, "--psi-threshold", type=float, default=s.psi_threshold, help="PSI at which a feature drifted")
    option(g, "--adwin-delta", type=float, default=s.adwin_delta, help="ADWIN confidence (false-alarm bound)")
    option(g, "--chi2-window", type=int, default=s.chi2_window, help="chi-square window (finish reason)")
    option(g, "--chi2-alpha", type=float, default=s.chi2_alpha, help="chi-square significance level")
    option(g, "--signal-every", type=int, default=s.signal_every,
           help="publish every detector's reading each this many events of a model version")
    option(g, "--calibration-every", type=int, default=s.calibration_every,
           help="publish accuracy, Brier and ECE each this many joined feedbacks")
    option(g, "--calibration-bins", type=int, default=s.calibration_bins, help="ECE bins")
    option(g, "--calibration-window", type=int, default=s.calibration_window, help="joined feedbacks kept")
    option(g, "--recalibration-min", type=int, default=s.recalibration_min,
           help="joined feedbacks of a version before a temperature is fitted to its probabilities")
    option(g, "--recalibration-every", type=int, default=s.recalibration_every,
           help="joined feedbacks between two temperature fits of a miscalibrated version")
    option(g, "--score-every", type=int, default=s.score_every,
           help="publish the mean of the Feedback scores (and ADWIN's reading on them) each this many scores")
    option(g, "--score-window", type=int, default=s.score_window, help="latest Feedback scores the mean is over")
    option(g, "--ece-threshold", type=float, default=s.ece_threshold, help="ECE at which calibration drifted")
    option(g, "--feedback-ttl", type=float, default=s.feedback_ttl_s,
           help="seconds (event time) an event waits for its feedback, and feedback for its event")
    option(g, "--quality-window", type=int, default=s.quality_window, help="completions per quality window")
    option(g, "--quality-baseline", type=int, default=s.quality_baseline,
           help="a version's first quality windows, that later ones are compared with")
    option(g, "--trend-window", type=int, default=s.trend_window, help="windows in the Mann-Kendall test")
    g = p.add_argument_group("candidate against stable")
    option(g, "--compare-window", type=int, default=s.compare_window,
           help="a candidate version's latest events (and as many stable ones) compared with each other")
    option(g, "--compare-every", type=int, default=s.compare_every,
           help="compare a candidate with the stable version each this many of its events")
    option(g, "--compare-alpha", type=float, default=s.compare_alpha,
           help="significance level that marks a test's signal drifted (KS, Mann-Whitney, error rate, "
                "accuracy, chi-square); the rollout controller applies its own to the p-values")
    option(g, "--compare-min", type=int, default=s.compare_min, help="fewest values on each side for a test")
    option(g, "--compare-error-margin", type=float, default=s.compare_error_margin,
           help="rise of a candidate's error rate over stable's that its one-sided test looks past")
    option(g, "--compare-accuracy-margin", type=float, default=s.compare_accuracy_margin,
           help="fall of a candidate's accuracy (joined feedback) that its one-sided test looks past")
    return p


def options(args):
    s = Settings.from_dict({**vars(args), "feedback_ttl_s": args.feedback_ttl})  # options are named as the fields
    return RunnerOptions(bootstrap_servers=args.bootstrap_servers, group_id=args.group_id,
                         metrics_host=args.metrics_host, metrics_port=args.metrics_port,
                         checkpoint_interval=args.checkpoint_interval,
                         max_records=args.max_records, session_timeout_ms=args.session_timeout_ms, settings=s,
                         security=kafka_security.from_args(args))


def run(args) -> int:
    from stream_processors.runner import serve
    try:
        o = options(args)
    except ValueError as e:  # Kafka security settings; the message names the --kafka-* option
        print(f"vigil process: {e}", file=sys.stderr)
        return 2
    try:
        asyncio.run(serve(o))
    except PortError as e:
        print(f"vigil process: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0
