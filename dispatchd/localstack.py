"""Private Mosquitto and dispatchd processes on free loopback ports (demo, tests, benchmarks).

Never the machine's shared broker: each :class:`LocalMosquitto` writes its own
configuration into a directory it owns and listens on 127.0.0.1 only.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType


class ChildFailed(RuntimeError):
    """A process of ours (Mosquitto, dispatchd) did not start; the message names its log."""


class BrokerUnavailable(ChildFailed):
    """Mosquitto is not installed."""


def find_mosquitto() -> str:
    found = shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if os.access("/usr/sbin/mosquitto", os.X_OK) else None)
    if found is None:
        raise BrokerUnavailable("mosquitto is not installed (Debian package 'mosquitto'); "
                                "./dev installs it")
    return found


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A free loopback port below the kernel's ephemeral range.

    A server that restarts on the same port (a killed broker, a restarted dispatchd) must
    not find it taken by an outgoing connection: a client reconnecting to a port in the
    ephemeral range while nothing listens there can be given that same port as its own
    source port and connect to itself (TCP simultaneous open), holding the port.
    """
    low = _ephemeral_low()
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20_000, max(20_001, low))
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _Child:
    """A child process of ours: :meth:`kill` is a crash, :meth:`stop` a polite shutdown."""

    process: subprocess.Popen[bytes] | None = None
    stop_timeout = 5.0

    def _wait_ready(self, ready: Callable[[], bool], what: str, log: Path, timeout: float
                    ) -> None:
        """Poll ``ready`` until it is true; raise with ``log`` named if the child dies."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise ChildFailed(f"{what} exited with {self.process.returncode}; see {log}")
            if ready():
                return
            time.sleep(0.02)
        self.kill()
        raise ChildFailed(f"{what} was not ready in {timeout}s; see {log}")

    def kill(self) -> None:
        """SIGKILL: the process gets no chance to save or flush anything."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                self.kill()


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


class LocalMosquitto(_Child):
    """Start with :meth:`start` (or ``with``); :meth:`kill` and :meth:`start` again to
    simulate a crash. ``persistence`` keeps queued QoS 1 messages across restarts."""

    def __init__(self, *, port: int | None = None, persistence: bool = True,
                 directory: Path | None = None, max_queued: int = 100_000,
                 config: Path | None = None) -> None:
        """``config``: run this configuration file as it is (its listener must be on
        ``port``) instead of writing an open one."""
        self.port = port or free_port()
        self._tmp = None if directory else tempfile.TemporaryDirectory(prefix="flexops-mqtt-")
        self.directory = directory or Path(self._tmp.name)  # type: ignore[union-attr]
        self.directory.mkdir(parents=True, exist_ok=True)
        self.config_path = config or self.directory / "mosquitto.conf"
        self._log = open(self.directory / "mosquitto.log", "ab")  # noqa: SIM115
        if config is not None:
            return
        self.config_path.write_text("\n".join([
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous true",
            f"persistence {'true' if persistence else 'false'}",
            f"persistence_location {self.directory}/",
            "autosave_interval 1",
            f"max_queued_messages {max_queued}",
            "max_inflight_messages 0",
            "set_tcp_nodelay true",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "",
        ]))

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> LocalMosquitto:
        self.process = subprocess.Popen(
            [find_mosquitto(), "-c", str(self.config_path)],
            stdout=self._log, stderr=self._log, start_new_session=True,
        )
        self._wait_ready(lambda: _accepts(self.port), "mosquitto",
                         self.directory / "mosquitto.log", timeout)
        return self

    def close(self) -> None:
        self.stop()
        self._log.close()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> LocalMosquitto:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class DispatchdProcess(_Child):
    """``dispatchd serve`` as a separate process, as an operator would run it."""

    stop_timeout = 10.0

    def __init__(self, config: Path, *, mqtt_url: str | None = None, port: int | None = None,
                 log: Path | None = None, env: dict[str, str] | None = None) -> None:
        self.config = config
        self.env = env or {}
        self.mqtt_url = mqtt_url
        self.port = port or free_port()
        self.log_path = log or config.parent / "dispatchd.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> DispatchdProcess:
        import sys

        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "dispatchd.cli", "serve", "--config", str(self.config),
                 "--listen", f"127.0.0.1:{self.port}",
                 *(["--mqtt", self.mqtt_url] if self.mqtt_url else [])],
                stdout=log, stderr=log, start_new_session=True,
                env={**os.environ, **self.env},
            )
        self._wait_ready(self._healthy, "dispatchd", self.log_path, timeout)
        return self

    def _healthy(self) -> bool:
        import urllib.request

        try:
            with urllib.request.urlopen(f"{self.url}/healthz", timeout=0.5):
                return True
        except OSError:
            return False
