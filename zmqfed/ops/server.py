"""``OpsServer``: the read-only HTTP server of ``--metrics`` and ``--dashboard``.

It runs in threads of the node's process and serves only what the node's
loop last published (:attr:`Telemetry.latest <zmqfed.ops.telemetry.Telemetry.latest>`):
it never touches a socket of the federation or a Maintainer.  Routes:

=================== ============ ===============================================
path                served with  what
=================== ============ ===============================================
``/metrics``        metrics      the Prometheus text format
``/status.json``    both         the status document, with its ``health``
``/``               dashboard    the dashboard page (assets under ``/static/``)
``/rounds.json``    dashboard    round records for the charts (``?after=SEQ``)
``/topology.svg``   dashboard    the topology, drawn by :func:`zmqfed.topo.to_svg`
=================== ============ ===============================================

Only GET and HEAD are answered (405 otherwise).  It listens on 127.0.0.1
unless told otherwise.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from zmqfed.errors import ConfigError
from zmqfed.ops.status import health, to_json

if TYPE_CHECKING:
    from zmqfed.ops.metrics import MetricsExporter
    from zmqfed.ops.telemetry import Telemetry

__all__ = ["OpsServer", "parse_listen"]

log = logging.getLogger(__name__)

#: The dashboard's static files (shipped in the wheel) and their content types.
ASSETS = {
    "index.html": "text/html; charset=utf-8",
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
}
#: Seconds an idle connection is kept open.
IDLE_TIMEOUT = 30.0


def parse_listen(text: str, option: str = "--dashboard") -> tuple[str, int]:
    """``ADDR:PORT``, ``[IPV6]:PORT``, ``:PORT`` or ``PORT`` as ``(host, port)``.

    The host defaults to 127.0.0.1; port 0 takes a free port.  A
    ``ConfigError`` names ``option`` when ``text`` is not an address.
    """
    raw = text.strip()
    host, port_text = "127.0.0.1", raw
    if raw.startswith("["):
        end = raw.find("]")
        if end < 0 or raw[end + 1 : end + 2] != ":":
            raise ConfigError(f"{option}: expected [IPV6]:PORT, got {text!r}")
        host, port_text = raw[1:end], raw[end + 2 :]
    elif ":" in raw:
        head, _, port_text = raw.rpartition(":")
        if ":" in head:
            raise ConfigError(f"{option}: write an IPv6 address in brackets, got {text!r}")
        host = head or host
    if not host or any(c.isspace() or c in "/?#@" for c in host):
        raise ConfigError(f"{option}: {host!r} is not a host name or address")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"{option}: the port must be a number from 0 to 65535, got {text!r}")
    return host, int(port_text)


class _Handler(BaseHTTPRequestHandler):
    server: OpsServer
    protocol_version = "HTTP/1.1"
    timeout = IDLE_TIMEOUT

    def do_GET(self) -> None:
        self._answer(body=True)

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def _refuse_method(self) -> None:
        self.close_connection = True  # a body we do not read must not be taken for a request
        self._send(405, b"read-only: only GET and HEAD\n", "text/plain", {"Allow": "GET, HEAD"})

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _refuse_method

    def version_string(self) -> str:
        return "zmqfed"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def _send(
        self,
        code: int,
        payload: bytes,
        content_type: str,
        headers: dict[str, str] | None = None,
        *,
        body: bool = True,
    ) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header(
            "Content-Security-Policy",
            "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:",
        )
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if body:
            self.wfile.write(payload)

    def _answer(self, *, body: bool) -> None:
        url = urlsplit(self.path)
        try:
            route = self.server.route(url.path, parse_qs(url.query))
        except ValueError as exc:
            payload = to_json({"error": str(exc)}).encode()
            self._send(400, payload, "application/json", body=body)
            return
        except Exception:  # a bug here must not kill the server thread
            log.exception("ops server: %s failed", url.path)
            self._send(500, b"internal error\n", "text/plain", body=body)
            return
        if route is None:
            self._send(404, b"not found\n", "text/plain", body=body)
            return
        self._send(200, route[0], route[1], body=body)


class OpsServer(ThreadingHTTPServer):
    """Serves ``telemetry``'s snapshots over HTTP from a daemon thread.

    Parameters
    ----------
    telemetry:
        What to serve.
    host, port:
        Where to listen (:func:`parse_listen`; port 0 takes a free one).
    metrics:
        Exporter for ``/metrics`` (None: not served).
    dashboard:
        Serve the dashboard, with ``topology_svg`` as its drawing.
    """

    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self,
        telemetry: Telemetry,
        host: str,
        port: int,
        *,
        metrics: MetricsExporter | None = None,
        dashboard: bool = False,
        topology_svg: str = "",
    ) -> None:
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.telemetry = telemetry
        self.metrics = metrics
        self.dashboard = dashboard
        self.topology_svg = topology_svg.encode()
        self.assets: dict[str, bytes] = {}
        if dashboard:
            folder = resources.files("zmqfed.ops") / "dashboard"
            self.assets = {name: (folder / name).read_bytes() for name in ASSETS}
        super().__init__((host, port), _Handler)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """``http://HOST:PORT`` this server answers on."""
        host, port = self.server_address[:2]
        host = str(host)
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def start(self) -> OpsServer:
        """Serve from a daemon thread."""
        self._thread = threading.Thread(
            target=self.serve_forever,
            kwargs={"poll_interval": 0.25},
            daemon=True,
            name="zmqfed-ops",
        )
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving and close the listening socket."""
        if self._thread is not None:
            self.shutdown()
            self._thread.join(timeout=5.0)
            self._thread = None
        self.server_close()

    # -- routes ---------------------------------------------------------------------
    def route(self, path: str, query: dict[str, list[str]]) -> tuple[bytes, str] | None:
        """The body and content type for ``path`` (None: not found; ValueError: bad query)."""
        if path == "/status.json":
            return self.status_json().encode(), "application/json"
        if path == "/metrics" and self.metrics is not None:
            return self.metrics.render(), self.metrics.content_type
        if not self.dashboard:
            if path == "/":
                return b"zmqfed: /metrics /status.json\n", "text/plain; charset=utf-8"
            return None
        if path in ("/", "/index.html"):
            return self.assets["index.html"], ASSETS["index.html"]
        if path.startswith("/static/") and path[len("/static/") :] in ASSETS:
            name = path[len("/static/") :]
            return self.assets[name], ASSETS[name]
        if path == "/rounds.json":
            return self.rounds_json(query).encode(), "application/json"
        if path == "/topology.svg":
            return self.topology_svg, "image/svg+xml"
        return None

    def status_json(self) -> str:
        """The status document now, with ``updated`` and ``health`` as of this answer."""
        doc = dict(self.telemetry.latest.status)
        doc["updated"] = time.time()
        doc["health"] = health(doc, now=doc["updated"])
        return to_json(doc)

    def rounds_json(self, query: dict[str, list[str]]) -> str:
        """Round records with a ``seq`` above ``?after=`` (all kept ones by default)."""
        raw = query.get("after", ["0"])[-1]
        try:
            after = int(raw)
        except ValueError:
            raise ValueError(f"after must be an integer, got {raw[:40]!r}") from None
        records = [r for r in self.telemetry.latest.records if r["seq"] > after]
        return to_json({"records": records})
