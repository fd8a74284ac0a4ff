"""deploy/k8s/ and docs/deployment.md say only what pagestream does.

The manifests: every document is a valid Kubernetes object (kubernetes-validate: the API's own schemas, strict,
so a misspelt field fails); every pagestream container runs a command the CLI parses, as the service its
Deployment is named for; the environment variables are ones the code reads; the Redis URL comes from the secret
the docs tell how to make; the gateway's probes ask for its real health routes on its real port, with a timeout
longer than its readiness check takes; one scheduler; each worker asks for as many GPUs as its processes use.
The docs: every `pagestream` command in them parses, and every file they name exists.
"""
from __future__ import annotations

import inspect
import re

import kubernetes_validate
import pytest
import yaml

from conftest import REPO, parse_pagestream
from services.cli import SERVICES
from services.pipeline_client import PipelineClient

K8S = REPO / "deploy" / "k8s"
DOC = REPO / "docs" / "deployment.md"
KUBERNETES_VERSION = "1.30.0"       # an API version clusters still run; everything here is older than it
SECRET = "pagestream-redis"
SECRET_KEYS = {"url", "password"}


def manifests() -> list[tuple[str, dict]]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return [(name, doc) for name in kustomization["resources"]
            for doc in yaml.safe_load_all((K8S / name).read_text()) if doc is not None]


def workloads() -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc for _, doc in manifests() if doc["kind"] in ("Deployment", "StatefulSet")}


def containers():
    for name, workload in workloads().items():
        for container in workload["spec"]["template"]["spec"]["containers"]:
            yield name, workload, container


def test_kustomization_lists_every_manifest():
    listed = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    assert sorted(listed) == sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


@pytest.mark.parametrize("name,doc", manifests(), ids=lambda v: v if isinstance(v, str) else v["kind"])
def test_every_document_is_a_valid_kubernetes_object(name, doc):
    assert {"apiVersion", "kind", "metadata"} <= set(doc) and doc["metadata"]["name"]
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)     # raises, naming the field, if not


def test_every_pagestream_container_runs_its_service():
    services = set()
    for name, workload, container in containers():
        if not container["image"].startswith("pagestream"):
            continue
        args = parse_pagestream(container["command"] + container.get("args", []))
        assert args.command == "service" and args.service == name == container["name"]
        assert workload["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"] == name
        services.add(name)
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert "/models" in mounts, f"{name}: every service resolves the model, into its cache"
    assert services == set(SERVICES)


def test_environment_is_what_the_code_reads():
    source = "\n".join(p.read_text() for d in ("services", "engine") for p in (REPO / d).glob("*.py"))
    read = set(re.findall(r"PAGESTREAM_[A-Z_]+", source))
    # The model cache the pods mount at /models is the image's: its Dockerfile points PAGESTREAM_CACHE there.
    assert "PAGESTREAM_CACHE" in read and "PAGESTREAM_CACHE=/models" in (REPO / "Dockerfile").read_text()
    for name, _, container in containers():
        env = {e["name"]: e for e in container.get("env", [])}
        for var, entry in env.items():
            if var.startswith("PAGESTREAM_"):
                assert var in read, f"{name}: nothing reads {var}"
            ref = entry.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                assert ref["name"] == SECRET and ref["key"] in SECRET_KEYS, (name, var)
        if container["image"].startswith("pagestream"):
            # The URL may hold a password: from the secret, never on the command line.
            assert env["PAGESTREAM_REDIS_URL"]["valueFrom"]["secretKeyRef"] == {"name": SECRET, "key": "url"}
            assert not any("redis" in arg for arg in container["command"] + container.get("args", []))
    redis_env = {e["name"]: e for e in workloads()["redis"]["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert redis_env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": SECRET, "key": "password"}
    # The docs make the secret, with both keys, and a URL that reaches the Redis Service.
    doc = DOC.read_text()
    create = doc[doc.index(f"create secret generic {SECRET}"):].split("\n\n")[0]
    assert '--from-literal=password="$pw"' in create and '--from-literal=url="redis://:$pw@redis:6379/0"' in create
    redis_service = next(d for _, d in manifests() if d["kind"] == "Service" and d["metadata"]["name"] == "redis")
    assert redis_service["spec"]["ports"][0]["port"] == 6379


def test_gateway_probes_ask_its_health_routes():
    gateway_source = (REPO / "services" / "gateway.py").read_text()
    routes = set(re.findall(r'Route\("([^"]+)", api\.\w+, methods=\["GET"\]\)', gateway_source))
    (_, _, container), = [c for c in containers() if c[0] == "gateway"]
    args = parse_pagestream(container["command"])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": args.port, "grpc": args.grpc_port} and args.host == "0.0.0.0"
    probes = {kind: container[kind]["httpGet"] for kind in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert probes["readinessProbe"]["path"] == "/health/ready"
    assert probes["livenessProbe"]["path"] == probes["startupProbe"]["path"] == "/health"
    for probe in probes.values():
        assert probe["path"] in routes and ports[probe["port"]] == args.port
    # /health/ready sends a request through the pipeline and waits this long for it: the probe must wait longer.
    readiness_wait = inspect.signature(PipelineClient.ready).parameters["timeout_s"].default
    assert container["readinessProbe"]["timeoutSeconds"] > readiness_wait
    service = next(d for _, d in manifests() if d["kind"] == "Service" and d["metadata"]["name"] == "gateway")
    labels = workloads()["gateway"]["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert {p["targetPort"] for p in service["spec"]["ports"]} == set(ports)


def test_one_scheduler_and_a_gpu_per_worker_process():
    scheduler = workloads()["scheduler"]["spec"]
    assert scheduler["replicas"] == 1 and scheduler["strategy"]["type"] == "Recreate"
    (_, worker, container), = [c for c in containers() if c[0] == "worker"]
    args = parse_pagestream(container["command"])
    assert args.worker_name == "auto"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == args.tensor_parallel_size
    assert worker["spec"]["replicas"] >= 2
    for name, _, other in containers():
        if name != "worker":
            assert "nvidia.com/gpu" not in other.get("resources", {}).get("limits", {}), name


def doc_commands() -> list[list[str]]:
    """The `pagestream ...` commands in docs/deployment.md: in code blocks and in `inline code`."""
    text = DOC.read_text()
    lines = [line for block in re.findall(r"```sh\n(.*?)```", text, re.S) for line in block.splitlines()]
    lines += re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
    return [line.split() for line in lines if line.startswith("pagestream ")]


def test_every_command_in_the_docs_parses():
    commands = doc_commands()
    assert len(commands) >= 3
    for argv in commands:
        parse_pagestream(argv)


def test_every_file_the_docs_name_exists():
    named = set(re.findall(r"\b((?:deploy|services|schemas|tests|docs)/[\w./-]*\w|compose\.yaml|Dockerfile)\b",
                           DOC.read_text()))
    assert {"deploy/k8s/kustomization.yaml", "deploy/compose/bus.yaml", "deploy/compose/gpus.yaml"} <= named
    for path in named:
        assert (REPO / path).exists(), path
