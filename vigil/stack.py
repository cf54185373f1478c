"""The services `vigil up` runs beside the inference server, as child processes.

Each child is the same `vigil` command a user would run (`vigil process`, `vigil
alerting`, `vigil rollout`) pointed at the same broker. Their output is passed on line
by line behind the service's name, so one terminal shows the whole loop; a status line
per service says where it listens and whether it still runs. Stopping sends SIGTERM to
every child and waits for it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from dataclasses import dataclass, field

SERVICES = ("process", "alerting", "rollout")


@dataclass
class Service:
    name: str
    args: list[str]
    address: str  # where a person looks: metrics or admin URL
    proc: asyncio.subprocess.Process | None = None
    pump: asyncio.Task | None = None
    lines: list[str] = field(default_factory=list)

    def status(self) -> str:
        if self.proc is None:
            return "not started"
        if self.proc.returncode is None:
            return f"running, pid {self.proc.pid}"
        return f"exited with code {self.proc.returncode}"


def services(bootstrap: str, processor_metrics_port: int, alerting_port: int, rollout_port: int,
             skip: set[str], extra: dict[str, list[str]] | None = None) -> list[Service]:
    """The child services, each with its own port; `extra` adds options per service name
    (e.g. {"process": ["--ks-window", "60"]}), after the defaults so they win."""
    known = {
        "process": Service("process", ["--metrics-port", str(processor_metrics_port)],
                           f"http://127.0.0.1:{processor_metrics_port}/metrics"),
        "alerting": Service("alerting", ["--admin-port", str(alerting_port)], f"http://127.0.0.1:{alerting_port}"),
        "rollout": Service("rollout", ["--admin-port", str(rollout_port)], f"http://127.0.0.1:{rollout_port}"),
    }
    chosen = [s for name, s in known.items() if name not in skip]
    for s in chosen:
        s.args = [s.name, "--bootstrap-servers", bootstrap, *s.args, *(extra or {}).get(s.name, [])]
    return chosen


async def start(service: Service) -> None:
    service.proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "vigil.cli", *service.args, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    service.pump = asyncio.create_task(pump(service))


async def pump(service: Service) -> None:
    assert service.proc is not None and service.proc.stdout is not None
    async for raw in service.proc.stdout:
        line = raw.decode("utf-8", "replace").rstrip()
        if line.startswith("{") and line.endswith("}"):  # a JSON log line (--log-format json) stays one
            print(line, flush=True)
        else:
            print(f"{service.name:>9} | {line}", flush=True)
    code = await service.proc.wait()
    if code not in (0, -signal.SIGTERM):
        print(f"{service.name:>9} | exited with code {code}", flush=True)


def print_status(stack: list[Service]) -> None:
    for s in stack:
        print(f"  {s.name:<9} {s.status():<22} {s.address}", flush=True)


async def stop(stack: list[Service], timeout: float = 15.0) -> None:
    running = [s for s in stack if s.proc is not None and s.proc.returncode is None]
    for s in running:
        s.proc.send_signal(signal.SIGTERM)
    for s in running:
        try:
            await asyncio.wait_for(s.proc.wait(), timeout)
        except asyncio.TimeoutError:
            s.proc.kill()
            await s.proc.wait()
    for s in stack:
        if s.pump is not None:
            await s.pump
