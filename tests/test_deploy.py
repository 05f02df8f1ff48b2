"""Offline checks of deploy/: Kubernetes manifests, KServe resources and the container image.

Built-in kinds are validated with ``kubernetes-validate`` (strict: unknown fields fail) against
Kubernetes :data:`KUBERNETES_VERSION`. Custom resources (KServe's InferenceService and
ServingRuntime, the Prometheus Operator's PodMonitor and PrometheusRule) have no schema there:
the core/v1 containers they embed are validated inside a Pod, the alert rules with promtool,
and the rest by the checks below. The Dockerfile cannot be built here (no registry access), so
it is linted and its pins are compared with requirements.txt.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from ops.kserve import RUNTIME_ARGS
from tests.conftest import ROOT

KUBERNETES_VERSION = "1.31.0"
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
KSERVE = DEPLOY / "kserve"
CUSTOM_KINDS = {"InferenceService", "ServingRuntime", "PodMonitor", "PrometheusRule", "RequestAuthentication",
                "AuthorizationPolicy"}
APP = {"app.kubernetes.io/name": "skin-lesion"}


def documents(folder: Path) -> list[tuple[Path, dict]]:
    return [(path, doc) for path in sorted(folder.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text()) if doc]


ALL = documents(K8S) + documents(KSERVE)


def by_kind(kind: str, folder: Path | None = None) -> dict:
    found = [doc for path, doc in ALL if doc["kind"] == kind and (folder is None or path.parent == folder)]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def validate_pod_spec(spec: dict) -> None:
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "check"}, "spec": spec}
    kubernetes_validate.validate(pod, KUBERNETES_VERSION, strict=True)


def test_every_expected_manifest_is_there():
    kinds = sorted(doc["kind"] for _, doc in ALL)
    assert kinds == sorted(["Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy",
                            "PodMonitor", "PrometheusRule", "InferenceService", "ServingRuntime", "NetworkPolicy",
                            "RequestAuthentication", "AuthorizationPolicy", "PodMonitor"])
    for path, doc in ALL:
        assert doc["metadata"].get("namespace") == "skin-lesion", path


@pytest.mark.parametrize("path,doc", [(p, d) for p, d in ALL if d["kind"] not in CUSTOM_KINDS],
                         ids=lambda value: value.name if isinstance(value, Path) else "")
def test_builtin_kinds_validate_strictly(path, doc):
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_validation_catches_a_misspelt_field():
    broken = by_kind("Deployment")
    broken = yaml.safe_load(yaml.safe_dump(broken))
    broken["spec"]["strategy"]["rollingUpdate"]["maxUnavailabel"] = 0
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def containers() -> list[tuple[str, dict]]:
    """Every container spec in the manifests, with where it came from."""
    found = [("Deployment", c) for c in by_kind("Deployment")["spec"]["template"]["spec"]["containers"]]
    found += [("ServingRuntime", c) for c in by_kind("ServingRuntime")["spec"]["containers"]]
    model = by_kind("InferenceService")["spec"]["predictor"]["model"]
    found.append(("InferenceService", {"name": "kserve-container", "image": "from-runtime",
                                       **{k: v for k, v in model.items() if k in ("resources", "readinessProbe")}}))
    return found


def test_embedded_containers_of_custom_resources_validate_as_pods():
    validate_pod_spec({"containers": by_kind("ServingRuntime")["spec"]["containers"]})
    validate_pod_spec({"containers": [c for kind, c in containers() if kind == "InferenceService"]})


def test_lint_images_limits_probes_and_security():
    for kind, container in containers():
        image = container["image"]
        if image != "from-runtime":
            assert ":" in image and not image.endswith(":latest"), f"{kind}: pin the image tag, not {image}"
            assert re.search(r":\d+\.\d+\.\d+$", image), f"{kind}: image tag must be a release version: {image}"
        resources = container["resources"]
        for key in ("cpu", "memory"):
            assert key in resources["requests"] and key in resources["limits"], f"{kind}: {key} requests and limits"
        # Guaranteed QoS for CPU: the workers x threads sizing assumes whole cores.
        assert resources["requests"]["cpu"] == resources["limits"]["cpu"], kind
    pod = by_kind("Deployment")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["path"] == "/ping", probe
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert pod["automountServiceAccountToken"] is False
    assert by_kind("InferenceService")["spec"]["predictor"]["model"]["readinessProbe"]["httpGet"]["path"] == "/ping"
    runtime = by_kind("ServingRuntime")["spec"]["containers"][0]
    assert runtime["securityContext"]["runAsNonRoot"] is True
    # Both start TorchServe exactly like KServe's runtime (the bundle test runs that command).
    assert tuple(runtime["args"]) == RUNTIME_ARGS and tuple(container["args"]) == RUNTIME_ARGS
    assert {p["containerPort"] for p in container["ports"]} == {8080, 8082}


def test_rolling_update_never_drops_capacity_and_disruptions_keep_a_pod():
    deployment = by_kind("Deployment")
    strategy = deployment["spec"]["strategy"]
    assert strategy["type"] == "RollingUpdate" and strategy["rollingUpdate"]["maxUnavailable"] == 0
    assert strategy["rollingUpdate"]["maxSurge"] >= 1
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    for kind in ("Service", "PodDisruptionBudget"):
        selector = by_kind(kind)["spec"]["selector"]
        selector = selector.get("matchLabels", selector)
        assert selector.items() <= labels.items(), kind
    assert by_kind("PodDisruptionBudget")["spec"]["minAvailable"] >= 1
    assert by_kind("PodDisruptionBudget")["spec"]["minAvailable"] < deployment["spec"]["replicas"]
    hpa = by_kind("HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert hpa["minReplicas"] >= 2
    # The signal is queueing, not CPU or memory.
    assert [m["type"] for m in hpa["metrics"]] == ["Pods"]
    assert "queue" in hpa["metrics"][0]["pods"]["metric"]["name"]


def test_only_the_ingress_reaches_inference_and_management_is_never_exposed():
    policy = by_kind("NetworkPolicy", K8S)["spec"]
    assert policy["podSelector"]["matchLabels"] == APP and policy["policyTypes"] == ["Ingress", "Egress"]
    assert policy["egress"] == []  # the pod connects nowhere
    admitted = {}
    for rule in policy["ingress"]:
        assert rule.get("from"), "a rule without `from` admits every source"
        for port in rule["ports"]:
            admitted.setdefault(port["port"], []).extend(rule["from"])
    assert set(admitted) == {8080, 8082}
    assert all(source["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "ingress-nginx"}
               for source in admitted[8080])
    service_ports = {p["port"] for p in by_kind("Service")["spec"]["ports"]}
    assert service_ports == {8080}
    # TorchServe itself binds management to the pod's loopback.
    properties = (KSERVE / "config.properties").read_text()
    assert re.search(r"^management_address=http://127\.0\.0\.1:\d+$", properties, re.M)


# KServe's labels on every pod of an InferenceService's predictor (kserve pkg/constants:
# InferenceServiceLabel = "serving.kserve.io/inferenceservice", KServiceComponentLabel = "component",
# PredictorComponent = "predictor").
def predictor_labels() -> dict:
    return {"serving.kserve.io/inferenceservice": by_kind("InferenceService")["metadata"]["name"],
            "component": "predictor"}


def test_kserve_predictor_pods_are_selected_by_kserves_labels_and_fenced_in_and_out():
    policy = by_kind("NetworkPolicy", KSERVE)["spec"]
    assert policy["podSelector"]["matchLabels"] == predictor_labels()
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    admitted = {}
    for rule in policy["ingress"]:
        assert rule.get("from") and rule.get("ports"), "a rule without `from` or `ports` admits every source or port"
        for source in rule["from"]:
            # Named pods of named namespaces only: never "any pod" or "any namespace".
            assert source["namespaceSelector"]["matchLabels"] and source["podSelector"]["matchLabels"], source
        for port in rule["ports"]:
            admitted.setdefault(port["port"], []).extend(rule["from"])
    # queue-proxy (requests from the activator and the gateway), its metrics (the autoscaler),
    # TorchServe's metrics (Prometheus); never TorchServe's 8080 or management directly.
    assert set(admitted) == {8012, 9090, 8082}
    namespaces = {port: {s["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"] for s in sources}
                  for port, sources in admitted.items()}
    assert namespaces == {8012: {"knative-serving", "istio-system"}, 9090: {"knative-serving"}, 8082: {"monitoring"}}
    # Egress: DNS, istiod and the model storage only, each to a named destination.
    egress_ports = set()
    for rule in policy["egress"]:
        assert rule.get("to") and rule.get("ports"), "an egress rule without `to` or `ports` allows everything"
        egress_ports |= {port["port"] for port in rule["ports"]}
        for destination in rule["to"]:
            assert "ipBlock" in destination or destination["podSelector"]["matchLabels"], destination
    assert egress_ports == {53, 15012, 443}


def test_kserve_requests_need_a_valid_jwt_except_knatives_probes_and_prometheus():
    authentication = by_kind("RequestAuthentication")
    policy = by_kind("AuthorizationPolicy")
    for resource in (authentication, policy):
        assert resource["apiVersion"] == "security.istio.io/v1beta1"
        assert resource["spec"]["selector"]["matchLabels"] == predictor_labels()
    [rule] = authentication["spec"]["jwtRules"]
    assert rule["issuer"].startswith("https://") and rule["jwksUri"].startswith("https://") and rule["audiences"]
    spec = policy["spec"]
    assert spec["action"] == "ALLOW"
    inference_paths = set()
    for rule in spec["rules"]:
        sources = rule["from"]
        operations = [to["operation"] for to in rule["to"]]
        assert all(operation.get("paths") for operation in operations), "every rule names its paths"
        principals = [s["source"].get("requestPrincipals") for s in sources]
        if all(principals):
            # A JWT from the configured issuer, for the inference API only.
            assert all(p.startswith(authentication["spec"]["jwtRules"][0]["issuer"]) for ps in principals for p in ps)
            inference_paths |= {path for operation in operations for path in operation["paths"]}
        else:
            # Without a JWT: Knative's probes and metrics, or Prometheus on the metrics port.
            namespaces = {ns for s in sources for ns in s["source"]["namespaces"]}
            paths = {path for operation in operations for path in operation["paths"]}
            knative_probes = namespaces == {"knative-serving"} and paths == {"/healthz", "/metrics"}
            prometheus = (namespaces == {"monitoring"} and paths == {"/metrics"}
                          and all(operation.get("ports") == ["8082"] for operation in operations))
            assert knative_probes or prometheus, rule
    assert "/v1/models/skin_lesion:predict" in inference_paths and "/predictions/skin_lesion" in inference_paths
    assert "/v2/models/skin_lesion/infer" in inference_paths  # the Open Inference Protocol (protocolVersion v2)
    assert not any(path.startswith(("/models", "/token")) or path == "/*" for path in inference_paths)


def test_serving_runtime_is_read_only_unprivileged_and_writes_only_to_its_volumes():
    runtime = by_kind("ServingRuntime")["spec"]
    deployment = by_kind("Deployment")["spec"]["template"]["spec"]
    for container, volumes in ((runtime["containers"][0], runtime["volumes"]), (deployment["containers"][0],
                                                                               deployment["volumes"])):
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
        assert security["seccompProfile"] == {"type": "RuntimeDefault"} and security["capabilities"]["drop"] == ["ALL"]
        assert security.get("privileged", False) is False
        # TorchServe's writable places (TMPDIR: extracted archives; logs) are emptyDir mounts.
        env = {item["name"]: item["value"] for item in container["env"]}
        mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
        empty_dirs = {volume["name"] for volume in volumes if "emptyDir" in volume}
        for variable in ("TMPDIR", "LOG_LOCATION", "METRICS_LOCATION"):
            assert any(env[variable].startswith(path) and name in empty_dirs for path, name in mounts.items()), variable
        assert all("sizeLimit" in volume["emptyDir"] for volume in volumes if "emptyDir" in volume)
    assert runtime["containers"][0]["securityContext"]["runAsNonRoot"] is True
    validate_pod_spec({"containers": runtime["containers"], "volumes": runtime["volumes"]})


def test_config_snapshots_are_off_wherever_torchserve_starts():
    """TorchServe 0.12 turns snapshots off only on its command line (--ncs); every start passes it."""
    import inspect

    from ops.torchserve import start

    assert "--ncs" in RUNTIME_ARGS
    assert "--ncs" in by_kind("ServingRuntime")["spec"]["containers"][0]["args"]
    assert "--ncs" in by_kind("Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert '"--ncs"' in inspect.getsource(start)
    cmd = next(args for instruction, args in dockerfile_instructions() if instruction == "CMD")
    assert "--ncs" in yaml.safe_load(cmd)


def test_podmonitor_scrapes_every_pod_as_the_torchserve_job_with_a_replica_label():
    monitor = by_kind("PodMonitor", K8S)
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["selector"]["matchLabels"] == APP
    [endpoint] = monitor["spec"]["podMetricsEndpoints"]
    ports = {p["name"]: p["containerPort"] for p in by_kind("Deployment")["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert ports[endpoint["port"]] == 8082 and endpoint["path"] == "/metrics"
    relabel = {r["targetLabel"]: r for r in endpoint["relabelings"]}
    assert relabel["job"]["replacement"] == "torchserve"  # the job alerts.yml selects
    assert relabel["replica"]["sourceLabels"] == ["__meta_kubernetes_pod_name"]


def test_kserve_predictor_pods_are_scraped_as_the_job_the_alerts_select():
    monitor = by_kind("PodMonitor", KSERVE)
    assert monitor["spec"]["selector"]["matchLabels"] == predictor_labels()
    [endpoint] = monitor["spec"]["podMetricsEndpoints"]
    relabel = {r["targetLabel"]: r for r in endpoint["relabelings"]}
    assert relabel["job"]["replacement"] == "torchserve"
    assert relabel["__address__"]["sourceLabels"] == ["__meta_kubernetes_pod_ip"]
    assert relabel["__address__"]["replacement"].endswith(":8082") and endpoint["path"] == "/metrics"
    assert relabel["replica"]["sourceLabels"] == ["__meta_kubernetes_pod_name"]
    alerts = (ROOT / "config" / "prometheus" / "alerts.yml").read_text()
    assert 'up{job="torchserve"}' in alerts


def test_prometheusrule_carries_the_tested_alert_rules(tmp_path):
    rule = by_kind("PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    alerts = yaml.safe_load((ROOT / "config" / "prometheus" / "alerts.yml").read_text())
    assert rule["spec"]["groups"] == alerts["groups"], \
        "deploy/k8s/prometheusrule.yaml is out of date: copy config/prometheus/alerts.yml's groups into its spec"
    if shutil.which("promtool"):
        path = tmp_path / "rules.yml"
        path.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
        check = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr


def test_inferenceservice_uses_the_runtime_autoscales_on_concurrency_and_canaries():
    service = by_kind("InferenceService")
    assert service["apiVersion"] == "serving.kserve.io/v1beta1"
    predictor = service["spec"]["predictor"]
    runtime = by_kind("ServingRuntime")
    assert runtime["apiVersion"] == "serving.kserve.io/v1alpha1"
    assert predictor["model"]["runtime"] == runtime["metadata"]["name"]
    assert predictor["model"]["modelFormat"]["name"] == "pytorch"
    assert {f["name"] for f in runtime["spec"]["supportedModelFormats"]} == {"pytorch"}
    assert predictor["model"]["protocolVersion"] in runtime["spec"]["protocolVersions"]
    assert re.match(r"^(s3|gs|pvc|https)://", predictor["model"]["storageUri"])
    assert 1 <= predictor["minReplicas"] < predictor["maxReplicas"]
    assert predictor["scaleMetric"] == "concurrency" and predictor["scaleTarget"] > 0
    assert 0 < predictor["canaryTrafficPercent"] < 100
    annotations = service["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/port"] == "8082"
    assert annotations["serving.kserve.io/enable-prometheus-scraping"] == "true"
    assert runtime["metadata"]["annotations"]["prometheus.kserve.io/port"] == "8082"


# ---------------------------------------------------------------------------------------------
# The container image


def requirement_pins(text: str) -> dict[str, str]:
    pins = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        match = re.fullmatch(r"([A-Za-z0-9_.\-\[\]]+)==([^\s;]+)", line)
        if match:
            pins[match.group(1).lower().replace("_", "-")] = match.group(2)
    return pins


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (DEPLOY / "Dockerfile").read_text()
    joined = re.sub(r"\\\n", " ", text)
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "")
            for line in (raw.strip() for raw in joined.splitlines()) if line and not line.startswith("#")]


def test_dockerfile_pins_equal_requirements_txt():
    requirements = requirement_pins((ROOT / "requirements.txt").read_text())
    runs = " ".join(args for instruction, args in dockerfile_instructions() if instruction == "RUN")
    pinned = {name.lower().replace("_", "-"): version for name, version in re.findall(r"\b([A-Za-z0-9_.\-]+)==([\w.+\-]+)", runs)}
    assert pinned, "the Dockerfile pins nothing"
    for name, version in pinned.items():
        assert requirements.get(name) == version, f"Dockerfile pins {name}=={version}, requirements.txt {requirements.get(name)}"
    # Everything else comes from requirements.txt itself, copied into the image.
    copies = [args for instruction, args in dockerfile_instructions() if instruction == "COPY"]
    assert any(args.split()[0] == "requirements.txt" for args in copies)
    assert "pip install -r /tmp/requirements.txt" in runs
    # The Python of the base image is the project's.
    base = next(args for instruction, args in dockerfile_instructions() if instruction == "FROM")
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm", base), base


def test_dockerfile_lint():
    instructions = dockerfile_instructions()
    names = [instruction for instruction, _ in instructions]
    base = next(args for instruction, args in instructions if instruction == "FROM")
    assert ":" in base and "latest" not in base
    runs = [args for instruction, args in instructions if instruction == "RUN"]
    text = " ".join(runs)
    # No downloads outside the package managers; apt lists removed; Java 17 for the frontend.
    assert not re.search(r"\b(curl|wget)\b", text) and "ADD" not in names
    assert "openjdk-17-jre-headless" in text and "--no-install-recommends" in text and "rm -rf /var/lib/apt/lists/*" in text
    env = " ".join(args for instruction, args in instructions if instruction == "ENV")
    assert "PIP_NO_CACHE_DIR=1" in env
    # Non-root from the USER line on, and nothing runs as root after it.
    user_at = names.index("USER")
    user = instructions[user_at][1].split(":")[0]
    assert user not in ("root", "0") and "RUN" not in names[user_at:]
    healthcheck = next(args for instruction, args in instructions if instruction == "HEALTHCHECK")
    assert "/ping" in healthcheck and "--start-period" in healthcheck
    assert set(next(args for instruction, args in instructions if instruction == "EXPOSE").split()) == {"8080", "8082"}
    cmd = next(args for instruction, args in instructions if instruction == "CMD")
    assert tuple(yaml.safe_load(cmd)) == RUNTIME_ARGS
    # The build context admits only what the image copies.
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    assert "*" in ignore and "!runs/kserve-bundle/" in ignore


def test_entrypoint_keeps_torchserve_in_the_foreground(tmp_path):
    fake = tmp_path / "torchserve"
    fake.write_text("#!/bin/sh\necho \"$@\"\n")
    fake.chmod(0o755)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin"}
    run = lambda *args: subprocess.run(["sh", str(DEPLOY / "entrypoint.sh"), *args], env=env, capture_output=True,
                                       text=True, check=True).stdout.strip()
    assert run(*RUNTIME_ARGS) == " ".join(RUNTIME_ARGS[1:]) + " --foreground"
    # KServe's stock command (no --ncs) gets it too: no config snapshots whatever starts the image.
    assert run("torchserve", "--start", "--model-store=/m") == "--start --model-store=/m --foreground --ncs"
    assert run("torchserve", "--start", "--foreground") == "--start --foreground --ncs"
    assert run("torchserve", "--stop") == "--stop"
    assert run("echo", "hello") == "hello"
