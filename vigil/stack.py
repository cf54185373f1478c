"""The services `vigil up` runs beside the inference server, as child processes.

Each child is the same `vigil` command a user would run (`vigil process`, `vigil
alerting`, `vigil rollout`) pointed at the same broker. Their output is passed on line
by line behind the service's name, so one terminal shows the whole loop; a status line
per service says where it listens and whether it still runs. Each child runs in a process
group of its own, so Ctrl-C in the terminal reaches only `vigil up`, which stops them in
the reverse order of their start: SIGTERM, then time to write a last checkpoint or
snapshot, then SIGKILL.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from dataclasses import dataclass, field

SERVICES = ("process", "alerting", "rollout", "ui")
HOST = "127.0.0.1"  # where the children listen


@dataclass
class Service:
    name: str
    args: list[str]
    address: str  # where a person looks: metrics or admin URL
    proc: asyncio.subprocess.Process | None = None
    pump: asyncio.Task | None = None
    lines: list[str] = field(default_factory=list)
    stopping: bool = False

    def status(self) -> str:
        if self.proc is None:
            return "not started"
        if self.proc.returncode is None:
            return f"running, pid {self.proc.pid}"
        return f"exited with code {self.proc.returncode}"


def services(bootstrap: str, processor_metrics_port: int, alerting_port: int, rollout_port: int,
             skip: set[str], extra: dict[str, list[str]] | None = None, ui_port: int = -1,
             ui_keys: str = "") -> list[Service]:
    """The child services, each with its own port; `extra` adds options per service name
    (e.g. {"process": ["--ks-window", "60"]}), after the defaults so they win. The page
    (`vigil ui`) runs only where a `ui_port` is given: its actions go to the rollout
    controller, its silences come from alerting (each where it runs), and `ui_keys`, the
    server's key file, puts its actions behind an admin key."""
    known = {
        "process": Service("process", ["--metrics-host", HOST, "--metrics-port", str(processor_metrics_port)],
                           f"http://{HOST}:{processor_metrics_port}/metrics"),
        "alerting": Service("alerting", ["--admin-host", HOST, "--admin-port", str(alerting_port)],
                            f"http://{HOST}:{alerting_port}"),
        "rollout": Service("rollout", ["--host", HOST, "--admin-port", str(rollout_port)],
                           f"http://{HOST}:{rollout_port}"),
    }
    if ui_port >= 0:
        ui = ["--host", HOST, "--port", str(ui_port)]
        if "rollout" not in skip:
            ui += ["--rollout-url", f"http://{HOST}:{rollout_port}"]
        if "alerting" not in skip:
            ui += ["--alerting-url", f"http://{HOST}:{alerting_port}"]
        if ui_keys:
            ui += ["--auth-keys", os.path.abspath(ui_keys)]
        known["ui"] = Service("ui", ui, f"http://{HOST}:{ui_port}/")
    chosen = [s for name, s in known.items() if name not in skip]
    for s in chosen:
        s.args = [s.name, "--bootstrap-servers", bootstrap, *s.args, *(extra or {}).get(s.name, [])]
    return chosen


async def start(service: Service) -> None:
    service.proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "vigil.cli", *service.args, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, process_group=0)
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
    if not service.stopping:
        print(f"{service.name:>9} | exited with code {code}", flush=True)


def print_status(stack: list[Service]) -> None:
    for s in stack:
        print(f"  {s.name:<9} {s.status():<22} {s.address}", flush=True)


async def stop(stack: list[Service], timeout: float = 15.0) -> None:
    """Stop the services one by one, the last started first: each gets SIGTERM and
    `timeout` seconds to exit before SIGKILL."""
    for s in reversed(stack):
        if s.proc is None:
            continue
        s.stopping = True
        if s.proc.returncode is None:
            s.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(s.proc.wait(), timeout)
            except asyncio.TimeoutError:
                print(f"{s.name:>9} | did not stop within {timeout:.0f} s: killed", flush=True)
                s.proc.kill()
                await s.proc.wait()
        if s.pump is not None:
            await s.pump
        print(f"{s.name:>9} | stopped, exit code {s.proc.returncode}", flush=True)
