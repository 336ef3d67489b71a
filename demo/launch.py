"""Start demo/app.py as its own process and wait until it answers: the one start-and-poll used by the tests
(tests/test_demo.py) and the soak test (demo/soak.py)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

APP = Path(__file__).resolve().parent / "app.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_demo(
    app_args: list[str], log_path: Path, cache_dir: Path, cwd: Path | None = None, timeout_s: float = 60.0
) -> tuple[subprocess.Popen, str]:
    """(process, url) of a demo serving on a free local port, uploads cached in `cache_dir`, output in `log_path`.
    Raises RuntimeError with the log's tail if the server exits or does not answer within `timeout_s`."""
    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "GRADIO_TEMP_DIR": str(cache_dir)}
    with open(log_path, "w") as log:  # the child keeps its own handle
        proc = subprocess.Popen(
            [sys.executable, str(APP), "--port", str(port), *app_args],
            cwd=cwd or Path.cwd(),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=1)
            return proc, url
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"demo exited with {proc.returncode}: {log_path.read_text()[-1500:]}") from None
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"demo did not answer within {timeout_s:.0f} s: {log_path.read_text()[-1500:]}")
