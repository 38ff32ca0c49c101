"""The monitoring files beside the Kubernetes manifest: the ServiceMonitor selects the tcsched Service and its
metrics port, and every tcsched_* series the Grafana dashboard queries is one the scheduler model exports."""

import json
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "docker" / "k8s"
SCHEDULER_MODEL = ROOT / "backends" / "python_scheduler" / "triton_models" / "scheduler.py"


def exported() -> dict[str, str]:
    """name -> kind of each MetricFamily the scheduler model creates (read from its source)."""
    src = SCHEDULER_MODEL.read_text()
    found = re.findall(r'"(tcsched_[a-z_]+)",\s*"[^"]*",\s*(C|H|pb_utils\.MetricFamily\.GAUGE)', src)
    kinds = {"C": "counter", "H": "histogram"}
    return {name: kinds.get(k, "gauge") for name, k in found}


def test_the_scheduler_exports_what_the_readme_names():
    names = exported()
    assert names == {
        "tcsched_decisions_total": "counter",
        "tcsched_fallbacks_total": "counter",
        "tcsched_escalations_total": "counter",
        "tcsched_bls_duration_seconds": "histogram",
        "tcsched_predicted_latency_seconds": "histogram",
        "tcsched_gpu_utilization": "gauge",
    }
    readme = (ROOT / "README.md").read_text()
    for n in names:
        assert f"`{n}`" in readme, n


def test_service_monitor_selects_the_service_metrics_port():
    (sm,) = list(yaml.safe_load_all((K8S / "servicemonitor.yaml").read_text()))
    docs = list(yaml.safe_load_all((K8S / "deployment.yaml").read_text()))
    service = next(d for d in docs if d["kind"] == "Service")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1" and sm["kind"] == "ServiceMonitor"
    assert sm["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (ep,) = sm["spec"]["endpoints"]
    port = next(p for p in service["spec"]["ports"] if p["name"] == ep["port"])
    assert port["port"] == 8002 and ep["path"] == "/metrics"


def test_dashboard_queries_only_exported_series():
    dash = json.loads((K8S / "grafana-dashboard.json").read_text())
    names = exported()
    allowed = set()
    for n, kind in names.items():
        allowed |= {f"{n}_bucket", f"{n}_sum", f"{n}_count"} if kind == "histogram" else {n}
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"\btcsched_[a-z_]+", e)}
    assert used and used <= allowed, used - allowed
    assert used >= {
        "tcsched_decisions_total",
        "tcsched_bls_duration_seconds_bucket",
        "tcsched_escalations_total",
    }
    assert all(p["datasource"]["uid"] == "${datasource}" for p in dash["panels"])
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    for e in exprs:  # balanced brackets: a typo would show as an empty panel
        assert (
            e.count("(") == e.count(")") and e.count("[") == e.count("]") and e.count("{") == e.count("}")
        ), e
