"""Running the real `orchestrator serve` in a subprocess."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ORCHESTRATOR = str(Path(sys.executable).parent / "orchestrator")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServeProcess:
    """`orchestrator serve` on a free port; `stop` signals it and returns the exit code."""

    def __init__(
        self,
        database_url: str,
        log: Path,
        *extra: str,
        port: int | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.port = port or free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log_path = log
        # Any free HTTP port (the default 8080 may be taken); `extra` may name one.
        environment = {
            **os.environ,
            "ORCHESTRATOR_LOG_FORMAT": "json",
            "ORCHESTRATOR_HTTP_PORT": "0",
            **(env or {}),
        }
        self._log = log.open("ab")
        self.proc = subprocess.Popen(
            [
                ORCHESTRATOR,
                "serve",
                "--port",
                str(self.port),
                "--database-url",
                database_url,
                *extra,
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=environment,
        )

    def wait_serving(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log_path.read_text()[-2000:]}")
            try:
                with grpc.insecure_channel(self.address) as ch:
                    reply = health_pb2_grpc.HealthStub(ch).Check(
                        health_pb2.HealthCheckRequest(), timeout=1
                    )
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"server not serving: {self.log_path.read_text()[-2000:]}")

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def wait(self, timeout: float = 30.0) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()
