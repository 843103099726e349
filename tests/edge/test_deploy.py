"""The shipped deployment files: deploy/k8s/edge.yaml checked field by field (it is not applied to a
cluster here), deploy/haproxy.cfg checked by HAProxy itself where it is installed (the slow
tests/edge/test_edge_replicas.py runs it for real)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from covspec.cli import build_parser
from covspec.edge_runtime.metrics import PROBES

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


@pytest.fixture(scope="module")
def manifest() -> dict[tuple[str, str], dict]:
    yaml = pytest.importorskip("yaml")
    docs = [d for d in yaml.safe_load_all((DEPLOY / "k8s" / "edge.yaml").read_text()) if d]
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


def port_number(container: dict, port: int | str) -> int:
    """A probe's or Service's port: a number, or the name of one of the container's ports."""
    if isinstance(port, int):
        return port
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert port in named, f"port {port!r} is not one of the container's ({', '.join(named)})"
    return named[port]


def test_k8s_manifest_fields(manifest):
    deployment = manifest["Deployment", "covspec-edge"]
    assert deployment["apiVersion"] == "apps/v1" and deployment["spec"]["replicas"] >= 2
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (container,) = pod["spec"]["containers"]
    # the arguments are `covspec edge serve` flags that parse
    assert container["command"] == ["covspec"]
    args = build_parser().parse_args(container["args"])
    assert (args.command, args.edge_command) == ("edge", "serve")
    zmq_port = int(args.bind.rsplit(":", 1)[1])
    metrics_port = int(args.metrics.rsplit(":", 1)[1])
    assert args.bind.startswith("tcp://0.0.0.0:") and args.metrics.startswith("0.0.0.0:"), "must listen beyond the pod"
    assert port_number(container, "zmq") == zmq_port and port_number(container, "metrics") == metrics_port
    # probes on the edge's own endpoints and port
    for probe, state in (("readinessProbe", "ready"), ("livenessProbe", "live")):
        get = container[probe]["httpGet"]
        assert PROBES[get["path"]] == state, f"{probe} must GET the {state} endpoint"
        assert port_number(container, get["port"]) == metrics_port
    # the grace period covers preStop and the whole drain, with room for the exit
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    grace = pod["spec"]["terminationGracePeriodSeconds"]
    assert grace >= float(pre_stop[1]) + args.drain_timeout + 5, (grace, pre_stop, args.drain_timeout)
    # the CURVE key files and the target come from the volumes mounted
    mounts = [m["mountPath"] for m in container["volumeMounts"]]
    for path in (args.model, args.key, args.allow):
        assert any(path == m or path.startswith(m.rstrip("/") + "/") for m in mounts), f"{path} is not mounted"
    volumes = {v["name"] for v in pod["spec"]["volumes"]}
    assert {m["name"] for m in container["volumeMounts"]} <= volumes
    # the devices' Service reaches the ZeroMQ port of these pods; the metrics one stays inside
    for name, port, kinds in (("covspec-edge", "zmq", {"LoadBalancer", "NodePort"}),
                              ("covspec-edge-metrics", "metrics", {"ClusterIP"})):
        service = manifest["Service", name]
        assert service["spec"]["type"] in kinds
        assert service["spec"]["selector"].items() <= labels.items()
        (entry,) = service["spec"]["ports"]
        assert entry["protocol"] == "TCP" and port_number(container, entry["targetPort"]) == port_number(container, port)


def test_haproxy_cfg_probes_readiness_in_tcp_mode():
    text = (DEPLOY / "haproxy.cfg").read_text()
    assert re.search(r"^\s*mode tcp$", text, re.M), "ZeroMQ needs TCP mode (one device connection, one replica)"
    assert "uri /readyz" in text and "expect status 200" in text
    servers = re.findall(r"^\s*server (\S+) 127\.0\.0\.1:(\d+) port (\d+)", text, re.M)
    assert len(servers) == 3 and len({s[1] for s in servers}) == 3
    binary = shutil.which("haproxy")
    if binary is None:
        pytest.skip("haproxy not installed (apt-get install haproxy): the file's syntax is checked where it is")
    check = subprocess.run([binary, "-c", "-f", str(DEPLOY / "haproxy.cfg")], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
