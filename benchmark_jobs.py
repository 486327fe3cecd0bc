"""The benchmark's shared record: `Job`, one request of a run and what was measured about it.

A leaf module (standard library only): `benchmark.py` (the client), `benchmark_clients.py`
(how requests are sent) and `benchmark_report.py` (statistics, report.json) all import it, and
nothing here imports them, so the three never import each other in a circle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Job:
    """One request of the run and everything measured about it (a row of report.json)."""

    index: int
    mode: str
    resolution: str
    width: int
    height: int
    seed: int
    payload: dict[str, Any]
    cold_start: bool = False
    job_id: str | None = None
    status: str = "NOT_RUN"
    error: str | None = None
    client_seconds: float | None = None
    delay_time_ms: float | None = None
    execution_time_ms: float | None = None
    timings: dict[str, float] | None = None
    output: dict[str, Any] | None = None  # the server's output, image_base64 left out
    image_file: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "COMPLETED" and self.error is None and self.image_file is not None

    def describe(self) -> str:
        outcome = f"{self.client_seconds:.2f} s" if self.ok else f"{self.status}: {self.error}"
        return f"{self.index:03d} {self.mode} {self.resolution}: {outcome}"
