"""The server's Prometheus metrics (``GET /metrics``), in a registry of its own per server."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ..core.report import PASS, SafetyReport

PREFIX = "vlm_safety"
OUTCOMES = ("completed", "cancelled", "timed_out", "rejected", "failed")
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class ServerMetrics:
    """Requests by outcome, answers by decision, refusals and interventions per defense,
    latency histograms (per defense and per request), queue depth and requests in flight."""

    def __init__(self):
        self.registry = CollectorRegistry()
        options = {"namespace": PREFIX, "registry": self.registry}
        self.requests = Counter(
            "requests", "Chat completion requests by outcome (a disconnect is cancelled).", ["outcome"], **options
        )
        self.choices = Counter(
            "choices", "Answers by safety decision (pass, modified, refused).", ["decision"], **options
        )
        self.refusals = Counter(
            "refusals",
            "Answers a defense replaced (its refusal or its own answer), per defense.",
            ["defense"],
            **options,
        )
        self.interventions = Counter(
            "interventions", "Answers a defense changed (decision not pass), per defense.", ["defense"], **options
        )
        self.defense_seconds = Histogram(
            "defense_seconds", "Time a defense spent on one answer.", ["defense"], buckets=LATENCY_BUCKETS, **options
        )
        self.request_seconds = Histogram(
            "request_seconds", "Time from a request's arrival to its last byte.", buckets=LATENCY_BUCKETS, **options
        )
        self.speculations = Counter(
            "speculations",
            "Answers a defense prepared before it knew it needed them (ETA's speculate), used or wasted.",
            ["defense", "outcome"],
            **options,
        )
        self.queue_depth = Gauge("queue_depth", "Requests admitted and waiting for a generation slot.", **options)
        self.in_flight = Gauge("requests_in_flight", "Requests admitted and not yet answered.", **options)
        for outcome in OUTCOMES:  # every series exists from the start, at zero
            self.requests.labels(outcome)

    def record(self, report: SafetyReport | None) -> None:
        """Count one answer's safety report."""
        if report is None:
            self.choices.labels(PASS).inc()
            return
        self.choices.labels(report.decision).inc()
        if report.refused:
            self.refusals.labels(report.refused_by or "unknown").inc()
        for record in report.defenses.values():
            self.defense_seconds.labels(record.name).observe(record.time_s)
            if record.decision != PASS:
                self.interventions.labels(record.name).inc()
            if record.replaced_answer and not report.refused:
                self.refusals.labels(record.name).inc()
            if record.details.get("speculation") in ("used", "wasted"):
                self.speculations.labels(record.name, record.details["speculation"]).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
