"""``/metrics``: a node's latest snapshot in the Prometheus text format.

:class:`SnapshotCollector` is a custom ``prometheus_client`` collector: at
each scrape it reads :attr:`Telemetry.latest <zmqfed.ops.telemetry.Telemetry.latest>`
(an immutable snapshot the loop thread published) and yields metric
families from it, so a scrape costs the message loop nothing.  Process
metrics (``process_resident_memory_bytes``, CPU, descriptors) come from
``prometheus_client``'s process collector.  Every name, label and its
bound on cardinality is listed in ``docs/operations.md``.

Needs the ``metrics`` extra (``pip install 'zmqfed[metrics]'``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from zmqfed.federated.protocol import ErrorCode
from zmqfed.ops.snapshot import HistogramState, numeric_metrics

if TYPE_CHECKING:
    from zmqfed.ops.telemetry import Telemetry

__all__ = ["STATES", "MetricsExporter", "SnapshotCollector"]

#: The values of ``zmqfed_state``'s ``state`` label.
STATES = ("starting", "running", "finished", "stopped", "failed")
#: Upload refusals always exported (so ``rate()`` starts from zero).
UPLOAD_REFUSALS = ("stale", ErrorCode.DISCARDED.value, ErrorCode.BAD_UPLOAD.value)


def _import_client() -> Any:
    try:
        import prometheus_client
        import prometheus_client.core
    except ImportError as exc:
        raise ImportError(
            "--metrics needs prometheus-client: pip install 'zmqfed[metrics]'"
        ) from exc
    return prometheus_client


def _buckets(state: HistogramState) -> list[tuple[str, float]]:
    return [("+Inf" if math.isinf(b) else repr(b), float(n)) for b, n in state.buckets]


class SnapshotCollector:
    """Yields zmqfed's metric families from a :class:`Telemetry`'s latest snapshot."""

    def __init__(self, telemetry: Telemetry) -> None:
        self.telemetry = telemetry
        self._m = _import_client().core

    def describe(self) -> list[Any]:
        return []  # families depend on the node's roles: described at collection

    def collect(self) -> Iterator[Any]:
        core = self._m
        snap = self.telemetry.latest
        st = snap.status
        gauge, counter = core.GaugeMetricFamily, core.CounterMetricFamily

        info = gauge("zmqfed_node_info", "This node: its name and roles.", labels=["node", "roles"])
        info.add_metric([str(st.get("node", "")), ",".join(st.get("roles", []))], 1)
        yield info
        state = gauge("zmqfed_state", "1 for the node's current state.", labels=["state"])
        for name in STATES:
            state.add_metric([name], float(st.get("state") == name))
        yield state
        yield gauge("zmqfed_round", "Rounds this node has done.", value=st.get("round", 0))
        yield gauge(
            "zmqfed_rounds_planned", "Rounds this node will run.", value=st.get("rounds", 0)
        )
        yield counter(
            "zmqfed_rounds_completed",
            "Rounds completed by this process.",
            value=snap.rounds_completed,
        )
        if snap.last_round_time is not None:
            yield gauge(
                "zmqfed_last_round_timestamp_seconds",
                "Unix time at which the last round completed.",
                value=snap.last_round_time,
            )
        yield gauge(
            "zmqfed_last_activity_timestamp_seconds",
            "Unix time at which the node's loop last published its state.",
            value=float(st.get("activity", 0.0)),
        )
        hist = core.HistogramMetricFamily(
            "zmqfed_round_duration_seconds", "Duration of each round (this process)."
        )
        hist.add_metric([], _buckets(snap.round_seconds), snap.round_seconds.sum)
        yield hist
        if "aggregator" in st.get("roles", []):
            agg = core.HistogramMetricFamily(
                "zmqfed_aggregation_duration_seconds",
                "Time to aggregate the uploads and step the server optimizers, per round.",
            )
            agg.add_metric([], _buckets(snap.aggregate_seconds), snap.aggregate_seconds.sum)
            yield agg
        last = st.get("last_record") or {}
        if last:
            yield gauge(
                "zmqfed_round_participants",
                "Uploads aggregated in the last round.",
                value=last.get("participants", 0),
            )
            metric = gauge(
                "zmqfed_last_round_metric",
                "The last round's metrics (evaluation, reduced uploads).",
                labels=["metric"],
            )
            for key, value in numeric_metrics(last.get("metrics") or {}).items():
                metric.add_metric([key], value)
            yield metric
        progress = st.get("progress") or {}
        yield gauge(
            "zmqfed_round_uploads",
            "Uploads received so far in the current round.",
            value=progress.get("uploads", 0),
        )
        yield gauge(
            "zmqfed_round_expected_uploads",
            "Uploads a round waits for at most.",
            value=progress.get("expected", 0),
        )
        if st.get("eta_seconds") is not None:
            yield gauge(
                "zmqfed_eta_seconds",
                "Estimated seconds until the last round is done.",
                value=st["eta_seconds"],
            )
        logs = counter(
            "zmqfed_log_messages", "Warnings and errors logged, by level.", labels=["level"]
        )
        for level in ("WARNING", "ERROR", "CRITICAL"):
            logs.add_metric([level], snap.log_counts.get(level, 0))
        yield logs
        yield from self._groups(st.get("groups", []))

    def _groups(self, groups: list[Mapping[str, Any]]) -> Iterator[Any]:
        gauge, counter = self._m.GaugeMetricFamily, self._m.CounterMetricFamily
        gr = ["group", "role"]
        fam: dict[str, Any] = {
            "peers": gauge("zmqfed_peers", "Peers in the group.", labels=gr),
            "online": gauge("zmqfed_peers_online", "Peers online.", labels=gr),
            "quorum": gauge(
                "zmqfed_peers_quorum", "Peers a round needs at least (uploads).", labels=gr
            ),
            "messages_received": counter(
                "zmqfed_received_messages", "Messages read, by kind.", labels=[*gr, "kind"]
            ),
            "bytes_received": counter(
                "zmqfed_received_bytes", "Bytes read, by message kind.", labels=[*gr, "kind"]
            ),
            "messages_sent": counter(
                "zmqfed_sent_messages", "Messages sent, by kind.", labels=[*gr, "kind"]
            ),
            "bytes_sent": counter(
                "zmqfed_sent_bytes", "Bytes sent, by message kind.", labels=[*gr, "kind"]
            ),
            "bytes_in": counter(
                "zmqfed_payload_received_bytes", "Tensor bytes received.", labels=gr
            ),
            "bytes_out": counter("zmqfed_payload_sent_bytes", "Tensor bytes sent.", labels=gr),
            "chunks_in": counter(
                "zmqfed_stream_chunks_received", "Chunks of streamed messages read.", labels=gr
            ),
            "chunks_out": counter(
                "zmqfed_stream_chunks_sent", "Chunks of streamed messages sent.", labels=gr
            ),
        }
        g = ["group"]
        agg: dict[str, Any] = {
            "accepted": counter("zmqfed_uploads_accepted", "Uploads counted.", labels=g),
            "duplicate": counter(
                "zmqfed_uploads_duplicate", "Retried uploads acknowledged again.", labels=g
            ),
            "refused": counter(
                "zmqfed_uploads_refused", "Uploads refused, by reason.", labels=[*g, "reason"]
            ),
            "messages_refused": counter(
                "zmqfed_messages_refused",
                "Messages answered with ERROR, by code.",
                labels=[*g, "reason"],
            ),
            "parked": counter("zmqfed_requests_parked", "Requests told to WAIT.", labels=g),
            "joins": counter("zmqfed_peer_joins", "Peers that joined (HELLO).", labels=g),
            "departures": counter("zmqfed_peer_departures", "Peers that left.", labels=g),
            "encodes": counter("zmqfed_model_encodes", "Encodings of the served model.", labels=g),
        }
        col: dict[str, Any] = {
            "resends": counter(
                "zmqfed_request_retries", "Requests sent again after a lost link.", labels=g
            ),
            "reconnects": counter(
                "zmqfed_reconnects", "Connections regained after a loss.", labels=g
            ),
            "disconnects": counter("zmqfed_disconnects", "Connections lost.", labels=g),
        }
        p = ["group", "peer"]
        peer: dict[str, Any] = {
            "online": gauge("zmqfed_peer_online", "1 when the peer is online.", labels=p),
            "bytes_in": counter(
                "zmqfed_peer_received_bytes", "Tensor bytes from the peer.", labels=p
            ),
            "bytes_out": counter("zmqfed_peer_sent_bytes", "Tensor bytes to the peer.", labels=p),
            "last_seen_seconds": gauge(
                "zmqfed_peer_last_seen_age_seconds", "Seconds since the peer last spoke.", labels=p
            ),
        }
        any_agg = any_col = any_peer = False
        for view in groups:
            group, role = str(view["group"]), str(view["role"])
            stats = view.get("stats", {})
            for key in ("peers", "online", "quorum"):
                fam[key].add_metric([group, role], view.get(key, 0))
            for key in ("messages_received", "bytes_received", "messages_sent", "bytes_sent"):
                for kind, n in sorted(stats.get(key, {}).items()):
                    fam[key].add_metric([group, role, kind], n)
            for key in ("bytes_in", "bytes_out", "chunks_in", "chunks_out"):
                fam[key].add_metric([group, role], stats.get(key, 0))
            if role == "aggregator":
                any_agg = True
                uploads = dict(stats.get("uploads", {}))
                agg["accepted"].add_metric([group], uploads.pop("accepted", 0))
                agg["duplicate"].add_metric([group], uploads.pop("duplicate", 0))
                for reason in UPLOAD_REFUSALS:
                    uploads.setdefault(reason, 0)
                for reason, n in sorted(uploads.items()):
                    agg["refused"].add_metric([group, reason], n)
                refused = {code.value: 0 for code in ErrorCode}
                refused.update(stats.get("refused", {}))
                for reason, n in sorted(refused.items()):
                    agg["messages_refused"].add_metric([group, reason], n)
                for key in ("parked", "joins", "departures", "encodes"):
                    agg[key].add_metric([group], stats.get(key, 0))
                for entry in view.get("top_peers", []):
                    any_peer = True
                    name = str(entry["peer"])
                    peer["online"].add_metric([group, name], float(entry["online"]))
                    peer["bytes_in"].add_metric([group, name], entry["bytes_in"])
                    peer["bytes_out"].add_metric([group, name], entry["bytes_out"])
                    if entry["last_seen_seconds"] is not None:
                        peer["last_seen_seconds"].add_metric(
                            [group, name], entry["last_seen_seconds"]
                        )
            else:
                any_col = True
                for key in ("resends", "reconnects", "disconnects"):
                    col[key].add_metric([group], stats.get(key, 0))
        yield from fam.values()
        if any_agg:
            yield from agg.values()
        if any_col:
            yield from col.values()
        if any_peer:
            yield from peer.values()


class MetricsExporter:
    """A registry with zmqfed's collector and the process collector; renders the text format."""

    def __init__(self, telemetry: Telemetry) -> None:
        client = _import_client()
        self._client = client
        self.registry = client.CollectorRegistry(auto_describe=False)
        self.registry.register(SnapshotCollector(telemetry))
        client.ProcessCollector(registry=self.registry)
        #: The Content-Type of :meth:`render`'s output.
        self.content_type: str = client.CONTENT_TYPE_LATEST

    def render(self) -> bytes:
        """The metrics now, in the Prometheus text exposition format."""
        return bytes(self._client.generate_latest(self.registry))
