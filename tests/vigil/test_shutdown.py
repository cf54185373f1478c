"""`vigil up` as a person runs it in a terminal: every listener on loopback, and Ctrl-C
(SIGINT to the whole foreground process group) stops the services in the reverse order
of their start, each cleanly, the broker last."""

from __future__ import annotations

import ipaddress
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time

import psutil

VIGIL = [sys.executable, "-m", "vigil.cli"]
READY = {
    "server": r"^vigil up: gRPC on ",
    "process": r"^\s*process \| vigil process: group .* metrics on http://127\.0\.0\.1:",
    "alerting": r"^\s*alerting \| vigil alerting: .* admin and metrics on http://127\.0\.0\.1:",
    "rollout": r"^\s*rollout \| vigil rollout .*: admin API on http://127\.0\.0\.1:",
}
STOPPED = [r"^vigil up: stopped the inference server$", r"^\s*rollout \| stopped, exit code 0$",
           r"^\s*alerting \| stopped, exit code 0$", r"^\s*process \| stopped, exit code 0$",
           r"^vigil up: stopped the broker \(exit code 0\)$"]


class Output:
    """The lines of a process's output, read in a thread, so a test can wait for one with a deadline."""

    def __init__(self, proc: subprocess.Popen):
        self.lines: list[str] = []
        self._queue: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, args=(proc.stdout,), daemon=True).start()

    def _read(self, stream) -> None:
        for line in stream:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, patterns: dict[str, str], deadline_s: float) -> None:
        missing = dict(patterns)
        deadline = time.monotonic() + deadline_s
        while missing:
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                break
            self.lines.append(line)
            for name, pattern in list(missing.items()):
                if re.search(pattern, line):
                    del missing[name]
        assert not missing, f"never saw {sorted(missing)}:\n" + "\n".join(self.lines)

    def rest(self, deadline_s: float) -> list[str]:
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                break
            self.lines.append(line)
        return self.lines


def listeners(pid: int) -> list[tuple[str, int, str]]:
    """(address, port, process name) of every listening TCP socket of pid and its descendants."""
    root = psutil.Process(pid)
    out = []
    for p in [root, *root.children(recursive=True)]:
        for c in p.net_connections(kind="tcp"):
            if c.status == psutil.CONN_LISTEN:
                out.append((c.laddr.ip, c.laddr.port, " ".join(p.cmdline()[2:5])))
    return out


def loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return ip.is_loopback or (ip.version == 6 and ip.ipv4_mapped is not None and ip.ipv4_mapped.is_loopback)


def test_vigil_up_listens_on_loopback_only_and_ctrl_c_stops_it_in_reverse_order(tmp_path):
    command = [*VIGIL, "up", "--model", "", "--port", "0", "--metrics-port", "0", "--broker-port", "0",
               "--processor-metrics-port", "0", "--alerting-port", "0", "--rollout-port", "0", "--ui-port", "0",
               "--http-port", "0"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env={**os.environ, "VIGIL_CACHE_DIR": str(tmp_path)})
    output = Output(proc)
    try:
        output.wait_for(READY, deadline_s=120)

        found = listeners(proc.pid)
        assert len(found) >= 6, found  # gRPC, metrics, broker, process metrics, alerting and rollout admin
        assert all(loopback(address) for address, _, _ in found), found

        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        assert proc.wait(timeout=90) == 0, "\n".join(output.rest(5))
    finally:
        if proc.poll() is None:  # its children have process groups of their own
            for p in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
                p.kill()
            proc.wait()
    lines = output.rest(10)
    text = "\n".join(lines)
    order = [next((i for i, line in enumerate(lines) if re.search(p, line)), None) for p in STOPPED]
    assert None not in order and order == sorted(order), f"stopped out of order {order}:\n{text}"
    last_checkpoint = next(i for i, line in enumerate(lines) if re.search(r"process \| vigil process: stopped", line))
    assert last_checkpoint < order[3], text
    assert "alerting | vigil alerting: shutting down" in text
    assert "killed" not in text and "code -" not in text, text
