"""A real MinIO server on a free loopback port, with generated credentials.

Tests and the demo talk to it exactly as users talk to S3: boto3 with
``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID`` and ``AWS_SECRET_ACCESS_KEY``.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import urllib.request
from pathlib import Path

from bootstrap import binary, ensure
from processes import free_port, start_server, stop_server, wait_until


class MinioServer:
    """One MinIO process serving ``workdir/data`` on 127.0.0.1.

    Args:
        workdir: data and log directory (a fresh one per session).
        port: fixed port, or 0 for a free one.
    """

    def __init__(self, workdir: Path, port: int = 0, startup_timeout: float = 60.0) -> None:
        self.workdir = Path(workdir)
        self.port = port
        self.startup_timeout = startup_timeout
        self.access_key = "torpor" + secrets.token_hex(4)
        self.secret_key = secrets.token_hex(20)
        self.log_path = self.workdir / "minio.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """The variables boto3 (and torpor) read to reach this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def __enter__(self) -> MinioServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        ensure("minio")
        self.port = self.port or free_port()
        data = self.workdir / "data"
        data.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env.update(
            MINIO_ROOT_USER=self.access_key, MINIO_ROOT_PASSWORD=self.secret_key,
            MINIO_BROWSER="off", MINIO_UPDATE="off", MINIO_CI_CD="1",
        )
        self._proc = start_server([
            str(binary("minio")), "server", str(data),
            "--address", f"127.0.0.1:{self.port}", "--console-address", f"127.0.0.1:{free_port()}", "--quiet",
        ], self.log_path, env=env)
        wait_until(lambda: _ready(f"{self.endpoint}/minio/health/ready"), timeout=self.startup_timeout,
                   what="minio", proc=self._proc, log_path=self.log_path, interval=0.2)

    def stop(self) -> None:
        stop_server(self._proc)
        self._proc = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None


def _ready(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=2) as resp:
        return resp.status == 200
