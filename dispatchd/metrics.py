"""Prometheus metrics of one dispatchd (served at ``/metrics``).

Each :class:`Metrics` has its own registry, so several services can run in one process
(tests, the demo) without clashing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

_FAST = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_SLOW = (0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 1800, 3600)


class _StateCounts(Collector):
    def __init__(self, counts: Callable[[], Mapping[str, int]]) -> None:
        self._counts = counts

    def collect(self) -> Iterable[GaugeMetricFamily]:
        family = GaugeMetricFamily("flexops_instructions", "Instructions by current state",
                                   labels=["state"])
        for state, count in sorted(self._counts().items()):
            family.add_metric([state], count)
        yield family


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.accept_seconds = Histogram(
            "flexops_accept_seconds", "Request received to answered, by endpoint",
            ["endpoint"], buckets=_FAST, registry=r)
        self.journal_commit_seconds = Histogram(
            "flexops_journal_commit_seconds", "Duration of one journal transaction",
            buckets=_FAST, registry=r)
        self.journal_batch_records = Histogram(
            "flexops_journal_batch_records", "Records per journal transaction",
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000), registry=r)
        self.delivered_seconds = Histogram(
            "flexops_accepted_to_delivered_seconds",
            "Journal commit of a revision to its first hand-over, per channel",
            ["channel"], buckets=_FAST, registry=r)
        self.acknowledged_seconds = Histogram(
            "flexops_accepted_to_acknowledged_seconds",
            "Journal commit of a revision to the FSP's answer", ["response"],
            buckets=_SLOW, registry=r)
        self.transitions = Counter(
            "flexops_transitions", "Revisions entering each state", ["state"], registry=r)
        self.sends = Counter(
            "flexops_sends", "Messages handed to a channel", ["channel", "attempt"],
            registry=r)
        self.send_failures = Counter(
            "flexops_send_failures", "Hand-overs that failed and are retried", ["channel"],
            registry=r)
        self.final_failures = Counter(
            "flexops_delivery_failures",
            "Messages a channel gave up on for good (a webhook 4xx, a refused mailbox)",
            ["channel"], registry=r)
        self.escalations = Counter(
            "flexops_escalations", "Instructions not answered by their respond-by, escalated",
            registry=r)
        self.stream_clients = Gauge(
            "flexops_stream_clients", "Connected websocket stream clients", ["role"],
            registry=r)
        self.stream_dropped = Counter(
            "flexops_stream_dropped", "Stream clients dropped by dispatchd", ["role", "reason"],
            registry=r)
        self.dropped_sends = Counter(
            "flexops_dropped_sends",
            "Sends not queued because the channel queue was full (left to the re-send timer)",
            ["channel"], registry=r)
        self.refused = Counter(
            "flexops_requests_refused", "Requests answered with an error", ["endpoint", "status"],
            registry=r)
        self.invalid_acks = Counter(
            "flexops_invalid_acks", "Acknowledgements refused, by channel and status",
            ["channel", "status"], registry=r)
        self.mqtt_connected = Gauge(
            "flexops_mqtt_connected", "1 while connected to the broker", registry=r)
        self.mqtt_reconnects = Counter(
            "flexops_mqtt_reconnects", "Broker connection attempts after a failure", registry=r)
        self.relay_messages = Counter(
            "flexops_relay_dispatches",
            "Dispatches from relaying platforms, by outcome (relayed, repeat, held, released, "
            "withdrawn, refused, unreadable)", ["platform", "status"], registry=r)
        self.uftp_messages = Counter(
            "flexops_uftp_messages", "Messages posted to the UFTP endpoint, by type (or "
            "'refused') and HTTP status", ["kind", "status"], registry=r)
        self.uftp_responses = Counter(
            "flexops_uftp_responses", "Signed UFTP responses delivered to DSOs, by result "
            "(or 'failed': not delivered)", ["result"], registry=r)
        self.relay_held_total = Counter(
            "flexops_relay_held", "Relayed dispatches held because their FSP is not mapped "
            "(the alarm)", ["platform"], registry=r)

    def watch(self, *, states: Callable[[], Mapping[str, int]], journal_depth: Callable[[], int],
              send_depth: Callable[[], int], email_depth: Callable[[], int],
              webhook_depth: Callable[[], int], unacknowledged: Callable[[], int],
              held: Callable[[], int] = lambda: 0,
              unreconciled: Callable[[], int] = lambda: 0) -> None:
        """Register the gauges read at scrape time from the running service."""
        self.registry.register(_StateCounts(states))
        for name, doc, fn in (
            ("flexops_journal_queue_depth", "Records waiting for the journal writer",
             journal_depth),
            ("flexops_mqtt_queue_depth", "Sends waiting for the broker", send_depth),
            ("flexops_email_queue_depth", "Emails waiting for (or being handed to) the SMTP "
             "server", email_depth),
            ("flexops_webhook_queue_depth", "Webhooks waiting for (or being sent to) FSPs",
             webhook_depth),
            ("flexops_unacknowledged", "Instructions whose latest revision awaits the FSP",
             unacknowledged),
            ("flexops_relay_held_now", "Relayed dispatches held now, waiting for an FSP "
             "mapping", held),
            ("flexops_unreconciled", "Relayed instructions not yet attached to a contract",
             unreconciled),
        ):
            Gauge(name, doc, registry=self.registry).set_function(fn)
