"""Helpers for the observability tests: an in-process OTLP/HTTP trace receiver, a loopback Prometheus, and the
queries the chart ships (dashboard panels, alert expressions, prometheus-adapter rules) in evaluable form.

(A uniquely named module: several test folders have their own non-package conftest.py.)
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "moss-speech"
DASHBOARD = CHART / "dashboards" / "moss-speech.json"
# Grafana variables -> what they mean over a short test run.
GRAFANA_VARS = {"$__rate_interval": "1m", "$namespace": ".*"}
GPU_METRICS = re.compile(r"\b(DCGM_FI_\w+|nv_gpu_\w+)")
GPU_MARK = "Needs a GPU"


# --- OTLP/HTTP receiver ---------------------------------------------------------------------------------
@dataclass
class Span:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    attributes: dict[str, Any]


class OtlpReceiver:
    """POST /v1/traces (protobuf ExportTraceServiceRequest), as a collector takes it; spans kept in memory."""

    def __init__(self) -> None:
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

        self.spans: list[Span] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if "json" in self.headers.get("Content-Type", ""):  # Triton's exporter (opentelemetry-cpp)
                    receiver._add_json(json.loads(body))
                else:  # the Python SDK's exporter
                    req = trace_service_pb2.ExportTraceServiceRequest()
                    req.ParseFromString(body)
                    receiver._add(req)
                out = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _add(self, req: Any) -> None:
        def value(v: Any) -> Any:
            return getattr(v, v.WhichOneof("value")) if v.WhichOneof("value") else None

        with self._lock:
            for rs in req.resource_spans:
                res = {a.key: value(a.value) for a in rs.resource.attributes}
                for ss in rs.scope_spans:
                    for s in ss.spans:
                        self.spans.append(
                            Span(
                                str(res.get("service.name", "")),
                                s.name,
                                s.trace_id.hex(),
                                s.span_id.hex(),
                                s.parent_span_id.hex(),
                                {a.key: value(a.value) for a in s.attributes},
                            )
                        )

    def _add_json(self, req: dict[str, Any]) -> None:
        """OTLP/JSON: ids are hex strings, attribute values {"stringValue": ...}."""

        def attrs(items: list[dict[str, Any]]) -> dict[str, Any]:
            return {a["key"]: next(iter(a.get("value", {}).values()), None) for a in items}

        with self._lock:
            for rs in req.get("resourceSpans", []):
                res = attrs(rs.get("resource", {}).get("attributes", []))
                for ss in rs.get("scopeSpans", rs.get("instrumentationLibrarySpans", [])):
                    for s in ss.get("spans", []):
                        self.spans.append(
                            Span(
                                str(res.get("service.name", "")),
                                s["name"],
                                s["traceId"].lower(),
                                s["spanId"].lower(),
                                s.get("parentSpanId", "").lower(),
                                attrs(s.get("attributes", [])),
                            )
                        )

    def snapshot(self) -> list[Span]:
        with self._lock:
            return list(self.spans)

    def close(self) -> None:
        self.server.shutdown()


# --- Prometheus -------------------------------------------------------------------------------------------
class Prometheus:
    """Debian's prometheus binary on loopback with its own config and storage (never the system service)."""

    def __init__(
        self, workdir: Path, port: int, targets: dict[str, tuple[str, dict[str, str]]], rule_files: list[Path] = ()
    ) -> None:
        self.binary = shutil.which("prometheus")
        self.port, self.workdir = port, workdir
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(p) for p in rule_files],
            "scrape_configs": [
                {"job_name": job, "static_configs": [{"targets": [addr], "labels": labels}]}
                for job, (addr, labels) in targets.items()
            ],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Prometheus:
        self.log = open(self.workdir / "prometheus.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                self.binary,
                f"--config.file={self.workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={self.workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if urllib.request.urlopen(f"{self.url}/-/ready", timeout=2).status == 200:
                    return self
            except OSError:
                time.sleep(0.3)
        raise TimeoutError((self.workdir / "prometheus.log").read_text()[-2000:])

    def api(self, path: str, **params: str) -> Any:
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            body = json.loads(urllib.request.urlopen(url, timeout=10).read())
        except urllib.error.HTTPError as e:  # 400: the query does not parse; the body says why
            body = json.loads(e.read())
        return body

    def query(self, expr: str) -> tuple[str, list[Any], str]:
        """(status, result, error) of an instant query."""
        body = self.api("query", query=expr)
        return body["status"], body.get("data", {}).get("result", []), body.get("error", "")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)
        self.log.close()


# --- the chart's queries -------------------------------------------------------------------------------------
@dataclass
class Query:
    source: str  # "dashboard", "alert", "adapter"
    name: str
    expr: str
    needs_gpu: bool = False


def grafana_expr(expr: str) -> str:
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    return expr


def dashboard_queries(dashboard: dict[str, Any]) -> list[Query]:
    out = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            gpu = bool(GPU_METRICS.search(target["expr"]))
            assert not gpu or GPU_MARK in panel["description"], f"{panel['title']}: GPU query without the mark"
            out.append(Query("dashboard", f"{panel['title']} [{target['refId']}]", grafana_expr(target["expr"]), gpu))
    return out


COMPARISON = re.compile(r"^(?P<lhs>.*\S)\s*(?:>|<|>=|<=|==|!=)\s*(?:bool\s+)?[0-9.eE+-]+\s*$", re.S)


def alert_queries(rule: dict[str, Any]) -> list[Query]:
    """Each alert's query without its threshold (what must return data), and the full expression."""
    out = []
    for group in rule["spec"]["groups"]:
        for r in group["rules"]:
            m = COMPARISON.match(r["expr"])
            assert m, f"{r['alert']}: expression is not `<query> <comparison> <threshold>`: {r['expr']}"
            out.append(Query("alert", r["alert"], m["lhs"]))
    return out


def adapter_queries(config: dict[str, Any], namespace: str, pods: list[str]) -> list[Query]:
    """prometheus-adapter's metricsQuery templates filled in as the adapter does for a pods metric."""
    out = []
    matchers = f'namespace="{namespace}",pod=~"{"|".join(pods)}"'
    for rule in config["rules"]:
        series = re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", rule["seriesQuery"])[0]
        expr = (
            rule["metricsQuery"]
            .replace("<<.Series>>", series)
            .replace("<<.LabelMatchers>>", matchers)
            .replace("<<.GroupBy>>", "pod")
        )
        out.append(Query("adapter", rule["name"]["as"], expr))
        out.append(Query("adapter", f"{rule['name']['as']} (seriesQuery)", rule["seriesQuery"]))
    return out
