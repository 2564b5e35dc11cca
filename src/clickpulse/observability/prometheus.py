"""A throw-away Prometheus server for tests and local checks: Debian's ``prometheus`` binary on a
free port with a temporary config and data directory (``apt-get install prometheus``).

Used by the integration test that checks every dashboard query against a real Prometheus
scraping a real worker (tests/integration/test_observability.py) and by the dashboard's query
syntax check (tests/unit/test_dashboard.py).
"""

from __future__ import annotations

import json
import math
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ServiceError


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class PrometheusServer:
    """``prometheus`` scraping ``targets`` (``{job: ["host:port", ...]}``) every
    ``scrape_interval_s``, with ``rule_files`` loaded; data and config under ``workdir``."""

    workdir: Path
    targets: dict[str, list[str]] = field(default_factory=dict)
    scrape_interval_s: float = 1.0
    rule_files: list[Path] = field(default_factory=list)
    port: int = 0
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def config(self) -> dict[str, Any]:
        iv = f"{int(self.scrape_interval_s * 1000)}ms"
        return {"global": {"scrape_interval": iv, "evaluation_interval": iv},
                "rule_files": [str(p) for p in self.rule_files],
                "scrape_configs": [{"job_name": job, "metrics_path": "/metrics",
                                    "static_configs": [{"targets": list(ts)}]} for job, ts in self.targets.items()]}

    def start(self, timeout_s: float = 60.0) -> PrometheusServer:
        """Start and wait until ``/-/ready`` answers.

        Raises
        ------
        ServiceError
            No ``prometheus`` binary on PATH, or it exited / did not get ready in time.
        """
        binary = shutil.which("prometheus")
        if binary is None:
            raise ServiceError("prometheus not found: install Debian's prometheus package "
                               "(apt-get install -y prometheus); .ci/run does it")
        self.workdir.mkdir(parents=True, exist_ok=True)
        cfg = self.workdir / "prometheus.yml"
        cfg.write_text(json.dumps(self.config()))  # JSON is YAML
        self.port = self.port or _free_port()
        log = (self.workdir / "prometheus.log").open("ab")
        self.proc = subprocess.Popen([binary, f"--config.file={cfg}", f"--storage.tsdb.path={self.workdir / 'data'}",
                                      f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
                                     stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServiceError(f"prometheus exited with {self.proc.returncode}; log: {self.workdir / 'prometheus.log'}")
            try:
                with urllib.request.urlopen(self.url + "/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.2)
        raise ServiceError(f"prometheus not ready after {timeout_s:.0f} s; log: {self.workdir / 'prometheus.log'}")

    def stop(self) -> None:
        from ..runtime import stop_process_group
        stop_process_group(self.proc, timeout_s=15)

    def api(self, path: str, **params: Any) -> Any:
        """``GET /api/v1/<path>``: the ``data`` of a successful answer.

        Raises
        ------
        ServiceError
            An error answer (e.g. a query that does not parse), with Prometheus's message.
        """
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=30) as r:
                body = json.loads(r.read())
        except urllib.error.HTTPError as err:
            body = json.loads(err.read() or b"{}")
        if body.get("status") != "success":
            raise ServiceError(f"prometheus {path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query_range(self, expr: str, start: float, end: float, step_s: float = 1.0) -> list[dict[str, Any]]:
        return self.api("query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}", step=f"{step_s:g}")["result"]


def finite_values(result: list[dict[str, Any]]) -> int:
    """How many finite sample values a query result (vector or matrix) holds (NaN and ±Inf,
    e.g. a histogram quantile with no observations in its window, do not count)."""
    n = 0
    for series in result:
        for _t, v in series.get("values") or ([series["value"]] if "value" in series else []):
            if math.isfinite(float(v)):
                n += 1
    return n
