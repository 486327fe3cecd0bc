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

    @property
    def similarities(self) -> list[float | None] | None:
        """The identity similarity of each identity (one for a single reference; None where
        it was not applied), or None without a face-swap report."""
        report = (self.output or {}).get("face_swap")
        if not isinstance(report, dict):
            return None
        if isinstance(report.get("identities"), list):
            return [entry.get("similarity") for entry in report["identities"]]
        return [report.get("similarity")]

    def describe(self) -> str:
        outcome = f"{self.client_seconds:.2f} s" if self.ok else f"{self.status}: {self.error}"
        return f"{self.index:03d} {self.mode} {self.resolution}: {outcome}"
