"""Offline checks of the Kubernetes deployment (deploy/k8s) and the container recipe.

No cluster here: the kustomize tree is rendered with `kubectl kustomize`, every object is
validated against the Kubernetes OpenAPI schemas bundled in kubernetes-validate (--strict:
unknown fields are errors), manifests and Dockerfile are linted with checkov, and the
properties the deployment depends on are asserted on the rendered objects.
"""

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.lb.tools import REPO, require

K8S = REPO / "deploy" / "k8s"
OVERLAYS = ["cpu", "gpu"]
# Custom resources: kubernetes-validate has no schema for them (it warns); their shape is
# asserted below instead.
CRD_KINDS = {"GRPCRoute", "HTTPRoute", "Gateway", "PodMonitor", "PrometheusRule"}
CLUSTER_SCOPED = {"Namespace"}
NAMESPACE = "ldm-serving"


def _render(path: Path) -> str:
    kubectl = require("kubectl")
    done = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def rendered() -> dict[str, str]:
    """Rendered YAML per target: the two overlays and the prometheus-adapter rules."""
    targets = {name: K8S / "overlays" / name for name in OVERLAYS}
    targets["monitoring"] = K8S / "monitoring"
    return {name: _render(path) for name, path in targets.items()}


@pytest.fixture(scope="module")
def objects(rendered) -> dict[str, list[dict]]:
    return {name: [o for o in yaml.safe_load_all(text) if o] for name, text in rendered.items()}


def _one(objs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _pod_spec(objs):
    return _one(objs, "Deployment", "ldm-triton")["spec"]["template"]["spec"]


def _container(objs, name="triton"):
    return next(c for c in _pod_spec(objs)["containers"] if c["name"] == name)


def _matches(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


# --- schema validation and lint -------------------------------------------------------------


@pytest.mark.parametrize("target", OVERLAYS + ["monitoring"])
def test_every_object_validates_strictly(rendered, objects, target, tmp_path):
    validator = require("kubernetes-validate")
    manifest = tmp_path / f"{target}.yaml"
    manifest.write_text(rendered[target])
    done = subprocess.run([validator, "--strict", str(manifest)], capture_output=True, text=True, timeout=120)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    builtin = [o for o in objects[target] if o["kind"] not in CRD_KINDS]
    passed = re.findall(r"^INFO .* passed for resource (\S+)", out, re.M)
    assert len(passed) == len(builtin), out
    # The only objects without a schema are the known custom resources.
    missing = set(re.findall(r"Couldn't find schema for kind (\S+)", out))
    assert missing == {o["kind"] for o in objects[target]} & CRD_KINDS, out
    assert "ERROR" not in out


def test_checkov_finds_nothing(rendered, tmp_path):
    checkov = require("checkov")
    for name, text in rendered.items():
        (tmp_path / f"{name}.yaml").write_text(text)
    (tmp_path / "Dockerfile").write_text((REPO / "deploy" / "Dockerfile").read_text())
    # --skip-download: no calls to the vendor's platform; the built-in checks run offline.
    done = subprocess.run(
        [
            checkov,
            "-d",
            str(tmp_path),
            "--framework",
            "kubernetes",
            "dockerfile",
            "--skip-download",
            "--output",
            "json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    reports = json.loads(done.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    by_type = {r["check_type"]: r for r in reports}
    assert set(by_type) == {"kubernetes", "dockerfile"}, done.stdout[:2000]
    failed = [(c["check_id"], c["resource"], c["check_name"]) for r in reports for c in r["results"]["failed_checks"]]
    assert failed == [], failed
    assert all(r["summary"]["passed"] > 0 for r in reports)
    # Every suppression is a documented annotation with a reason, not a blanket skip.
    for r in reports:
        for c in r["results"]["skipped_checks"]:
            assert c["check_id"] == "CKV_K8S_43" and c["check_result"].get("suppress_comment"), c
    assert done.returncode == 0, done.stdout[-2000:]


# --- properties of the Deployment -----------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_ask_the_engine_and_the_stub(objects, overlay):
    triton = _container(objects[overlay])
    # readiness: the engine itself admits (Triton's /v2/health/ready stays 200 once a drain has
    # stopped it; tests/server/test_control.py runs `ldm ready` against a drained server)
    import argparse

    from serving.triton import readiness

    for probe in ("startupProbe", "readinessProbe"):
        command = triton[probe]["exec"]["command"]
        assert command[:2] == ["ldm", "ready"], (probe, command)
        parser = argparse.ArgumentParser()
        readiness.add_arguments(parser)
        assert parser.parse_args(command[2:]).url == "127.0.0.1:8001"
    # liveness: the pipeline's python stub itself (Triton stays "live" when it has died;
    # tests/server/test_drain.py runs this command against a server whose stub is killed)
    command = triton["livenessProbe"]["exec"]["command"]
    assert command[:2] == ["ldm", "stub-check"], command
    from serving.triton import stubs

    parser = argparse.ArgumentParser()
    stubs.add_arguments(parser)
    assert parser.parse_args(command[2:]).model == "pipeline"
    # Startup allows minutes of model loading before liveness may restart the pod.
    startup = triton["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_dev_shm_is_memory_backed_and_mounted(objects, overlay):
    spec = _pod_spec(objects[overlay])
    mount = next(m for m in _container(objects[overlay])["volumeMounts"] if m["mountPath"] == "/dev/shm")
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    assert volume["emptyDir"]["medium"] == "Memory"
    size = volume["emptyDir"]["sizeLimit"]
    assert size.endswith("Gi") and int(size[:-2]) >= 1
    # Memory-backed volumes count against the container's memory limit: it must fit.
    limit = _container(objects[overlay])["resources"]["limits"]["memory"]
    assert int(limit[:-2]) > int(size[:-2])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_non_root_and_locked_down(objects, overlay):
    spec = _pod_spec(objects[overlay])
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] >= 10000
    assert spec["automountServiceAccountToken"] is False
    for c in spec["containers"] + spec.get("initContainers", []):
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False, c["name"]
        assert sc["readOnlyRootFilesystem"] is True, c["name"]
        assert sc["capabilities"]["drop"] == ["ALL"], c["name"]
        assert {"requests", "limits"} <= set(c["resources"]), c["name"]
    # Writable paths under the read-only root are explicit volumes.
    mounts = {m["mountPath"] for m in _container(objects[overlay])["volumeMounts"]}
    assert {"/tmp", "/dev/shm", "/model-repository"} <= mounts
    # The exporter reads the checkpoint and writes the repository the server reads; the server
    # needs only the repository (the pipeline's tokenizer and scheduler config are copied in).
    init = spec["initContainers"][0]
    assert {m["mountPath"] for m in init["volumeMounts"]} >= {"/checkpoint", "/model-repository"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_triton_ports_on_loopback_and_a_control_secret_per_pod(objects, overlay):
    """Triton's KServe ports skip the gateway's keys and limits: loopback only. Control
    messages need the secret an init container writes to a memory volume both containers read."""
    spec = _pod_spec(objects[overlay])
    triton = _container(objects[overlay])
    args = dict(a.removeprefix("--").split("=", 1) for a in triton["args"] if "=" in a)
    assert args["http-address"] == "127.0.0.1" and args["grpc-address"] == "127.0.0.1"
    writer = next(c for c in spec["initContainers"] if c["name"] == "control-secret")
    assert writer["args"][0] == "control-secret"
    (folder,) = {m["mountPath"] for m in writer["volumeMounts"]}
    assert writer["args"][1].startswith(folder + "/")
    volume = next(v for v in spec["volumes"] if v["name"] == writer["volumeMounts"][0]["name"])
    assert volume["emptyDir"]["medium"] == "Memory"
    for container in (triton, _container(objects[overlay], "gateway")):
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["LDM_CONTROL_SECRET_FILE"] == writer["args"][1], container["name"]
        mount = next(m for m in container["volumeMounts"] if m["name"] == volume["name"])
        assert mount["mountPath"] == folder and mount["readOnly"] is True


def test_dockerfile_user_matches_security_context(objects):
    text = (REPO / "deploy" / "Dockerfile").read_text()
    user = re.findall(r"^USER\s+(\d+)", text, re.M)
    assert user and int(user[-1]) == _pod_spec(objects["gpu"])["securityContext"]["runAsUser"]
    base = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert base and all(re.fullmatch(r"nvcr\.io/nvidia/tritonserver:\d{2}\.\d{2}-py3", b) for b in base), base


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_termination_grace_covers_drain(objects, overlay):
    """The triton container drains in its preStop hook (`ldm drain`, whose flags must parse),
    the gateway's drain outlasts it, and the pod's grace period covers both with slack."""
    import argparse

    from serving.triton import drain

    spec = _pod_spec(objects[overlay])
    triton, gateway = _container(objects[overlay]), _container(objects[overlay], "gateway")
    command = triton["lifecycle"]["preStop"]["exec"]["command"]
    assert command[:2] == ["ldm", "drain"], command
    parser = argparse.ArgumentParser()
    drain.add_arguments(parser)
    hook = parser.parse_args(command[2:])
    assert hook.url == "127.0.0.1:8001" and hook.delay_s > 0 and hook.grace_s > 0
    exit_timeout = next(int(a.split("=")[1]) for a in triton["args"] if a.startswith("--exit-timeout-secs="))
    assert exit_timeout > hook.grace_s
    gateway_drain = next(float(a.split("=")[1]) for a in gateway["args"] if a.startswith("--drain-s="))
    gateway_pre_stop = gateway["lifecycle"]["preStop"]["sleep"]["seconds"]
    # the gateway's calls in flight wait on Triton's drain: it must not close them earlier
    assert gateway_pre_stop + gateway_drain >= hook.delay_s + hook.grace_s
    grace = spec["terminationGracePeriodSeconds"]
    slack = 30  # the last VAE decodes and Triton's exit after the drain
    assert grace > hook.delay_s + hook.grace_s + slack
    assert grace > gateway_pre_stop + gateway_drain
    # not ready means no traffic: each container has its readiness probe
    assert triton["readinessProbe"]["exec"]["command"][:2] == ["ldm", "ready"]
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/readyz"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_runs_in_the_triton_pod_with_its_own_probes_and_keys(objects, overlay):
    """Same pod, so a request's stream reaches only its own replica's Triton (over loopback)."""
    spec = _pod_spec(objects[overlay])
    gateway = _container(objects[overlay], "gateway")
    args = dict(a.removeprefix("--").split("=", 1) for a in gateway["args"][1:])
    assert gateway["args"][0] == "gateway" and args["triton"] == "127.0.0.1:8001"
    triton_ports = {p["name"]: p["containerPort"] for p in _container(objects[overlay])["ports"]}
    assert triton_ports["grpc"] == 8001
    ports = {p["name"]: p["containerPort"] for p in gateway["ports"]}
    assert ports == {"rest": int(args["rest-port"]), "api": int(args["grpc-port"])} == {"rest": 8080, "api": 50051}
    expected = {"startupProbe": "/healthz", "readinessProbe": "/readyz", "livenessProbe": "/healthz"}
    for probe, path in expected.items():
        assert gateway[probe]["httpGet"] == {"path": path, "port": "rest"}, probe
    # API keys come hashed from a Secret volume, mounted read-only where --api-keys points
    mount = next(m for m in gateway["volumeMounts"] if args["api-keys"].startswith(m["mountPath"] + "/"))
    assert mount["readOnly"] is True
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    assert volume["secret"]["secretName"] == "ldm-api-keys"
    assert float(args["rate-limit"]) > 0 and float(args["burst"]) >= 8
    assert "nvidia.com/gpu" not in json.dumps(gateway)


def test_gpu_overlay_requests_gpus_and_tolerates_taint(objects):
    spec = _pod_spec(objects["gpu"])
    exporter = next(c for c in spec["initContainers"] if c["name"] == "export-model-repository")
    for c in [_container(objects["gpu"]), exporter]:  # the control-secret writer needs no GPU
        assert c["resources"]["limits"]["nvidia.com/gpu"] == "1", c["name"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    # The TensorRT plans are built by the init container on the node's own GPU.
    args = spec["initContainers"][0]["args"]
    assert args[args.index("--backend") + 1] == "tensorrt" and "--gpu" in args
    assert "nvidia.com/gpu" not in json.dumps(objects["cpu"])


# --- objects that refer to the Deployment's pods --------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_selectors_reach_the_deployment_pods(objects, overlay):
    objs = objects[overlay]
    deployment = _one(objs, "Deployment", "ldm-triton")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert _matches(deployment["spec"]["selector"]["matchLabels"], pod_labels)
    assert _matches(_one(objs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"], pod_labels)
    assert _matches(_one(objs, "PodMonitor")["spec"]["selector"]["matchLabels"], pod_labels)
    assert _matches(_one(objs, "NetworkPolicy")["spec"]["podSelector"]["matchLabels"], pod_labels)
    for svc in (o for o in objs if o["kind"] == "Service"):
        assert _matches(svc["spec"]["selector"], pod_labels), svc["metadata"]["name"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ports_are_named_and_resolve(objects, overlay):
    objs = objects[overlay]
    assert {p["name"]: p["containerPort"] for p in _container(objs)["ports"]} == {
        "http": 8000,
        "grpc": 8001,
        "metrics": 8002,
    }
    container_ports = {p["name"]: p["containerPort"] for c in _pod_spec(objs)["containers"] for p in c["ports"]}
    # the Services expose the gateway only: Triton's own protocols stay inside the pod
    for name in ("ldm-triton", "ldm-triton-headless"):
        service = _one(objs, "Service", name)
        assert {p["name"] for p in service["spec"]["ports"]} == {"api", "rest"}
        for p in service["spec"]["ports"]:
            assert p["targetPort"] in container_ports and p["name"] == p["targetPort"]
            assert p["port"] == container_ports[p["targetPort"]]
    headless = _one(objs, "Service", "ldm-triton-headless")
    assert headless["spec"]["clusterIP"] == "None"
    api = next(p for p in headless["spec"]["ports"] if p["name"] == "api")
    assert api["appProtocol"] == "kubernetes.io/h2c"
    rules = _one(objs, "NetworkPolicy")["spec"]["ingress"]
    for rule in rules:
        assert all(p["port"] in container_ports for p in rule["ports"])
    assert {p["port"] for r in rules for p in r["ports"]} == {"api", "rest", "metrics"}
    endpoints = _one(objs, "PodMonitor")["spec"]["podMetricsEndpoints"]
    assert {(e["port"], e["path"]) for e in endpoints} == {("metrics", "/metrics"), ("rest", "/metrics")}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_load_balancers_route_to_the_gateway(objects, overlay):
    objs = objects[overlay]
    service = _one(objs, "Service", "ldm-triton")
    ports = {p["name"]: p["port"] for p in service["spec"]["ports"]}
    gateway = _one(objs, "Gateway")
    for kind, port in (("GRPCRoute", ports["api"]), ("HTTPRoute", ports["rest"])):
        route = _one(objs, kind)
        assert route["spec"]["parentRefs"][0]["name"] == gateway["metadata"]["name"]
        listener = route["spec"]["parentRefs"][0]["sectionName"]
        assert any(
            entry["name"] == listener and {"kind": kind} in entry["allowedRoutes"]["kinds"]
            for entry in gateway["spec"]["listeners"]
        )
        backend = route["spec"]["rules"][0]["backendRefs"][0]
        assert (backend["name"], backend["port"]) == ("ldm-triton", port), kind
    grpc_route = _one(objs, "GRPCRoute")
    assert [m["method"] for m in grpc_route["spec"]["rules"][0]["matches"]] == [{"service": "ldm.v1.Images"}]
    paths = {m["path"]["value"] for m in _one(objs, "HTTPRoute")["spec"]["rules"][0]["matches"]}
    assert paths == {"/v1/images", "/v1/generations", "/", "/static", "/openapi.json", "/docs"}
    if overlay == "cpu":
        grpc_ingress = _one(objs, "Ingress", "ldm-triton-grpc")
        assert grpc_ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/backend-protocol"] == "GRPC"
        path = grpc_ingress["spec"]["rules"][0]["http"]["paths"][0]
        assert path["path"] == "/ldm.v1.Images" and path["backend"]["service"] == {
            "name": "ldm-triton",
            "port": {"name": "api"},
        }
        rest_ingress = _one(objs, "Ingress", "ldm-rest")
        assert rest_ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/backend-protocol"] == "HTTP"
        backends = {p["path"]: p["backend"]["service"] for p in rest_ingress["spec"]["rules"][0]["http"]["paths"]}
        assert set(backends) == paths and all(
            b == {"name": "ldm-triton", "port": {"name": "rest"}} for b in backends.values()
        )


def test_local_nginx_config_mirrors_the_ingress(objects):
    annotations = _one(objects["cpu"], "Ingress", "ldm-triton-grpc")["metadata"]["annotations"]
    ann = {k.split("/")[1]: v for k, v in annotations.items()}
    conf = (REPO / "deploy" / "nginx" / "ldm-grpc-lb.conf.template").read_text()

    def directive(name):
        m = re.search(rf"^\s*{name}\s+([^;]+);", conf, re.M)
        assert m, name
        return m.group(1)

    assert directive("grpc_next_upstream") == ann["proxy-next-upstream"]
    assert directive("grpc_next_upstream_tries") == ann["proxy-next-upstream-tries"]
    assert directive("grpc_read_timeout") == ann["proxy-read-timeout"] + "s"
    assert directive("grpc_send_timeout") == ann["proxy-send-timeout"] + "s"
    assert directive("grpc_connect_timeout") == ann["proxy-connect-timeout"] + "s"
    assert directive("client_max_body_size") == ann["proxy-body-size"]
    assert re.search(r"grpc_pass\s+grpc://", conf)
    # the same gRPC service as the Ingress's path
    path = _one(objects["cpu"], "Ingress", "ldm-triton-grpc")["spec"]["rules"][0]["http"]["paths"][0]["path"]
    assert re.search(rf"location\s+{re.escape(path)}/\s*{{", conf)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_hpa_scales_the_deployment_on_the_queue_metric(objects, overlay):
    objs = objects[overlay]
    hpa = _one(objs, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["kind"], ref["name"]) == ("Deployment", "ldm-triton")
    assert hpa["spec"]["minReplicas"] >= 2
    pdb = _one(objs, "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] < hpa["spec"]["minReplicas"]
    metric_names = {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]}
    assert all(m["type"] == "Pods" for m in hpa["spec"]["metrics"])
    # Every HPA metric is served by a prometheus-adapter rule, per pod.
    adapter = yaml.safe_load(_one(objects["monitoring"], "ConfigMap")["data"]["config.yaml"])
    rules = {r["name"]["as"]: r for r in adapter["rules"]}
    assert metric_names <= set(rules)
    for name in metric_names:
        assert rules[name]["resources"]["overrides"]["pod"] == {"resource": "pod"}
    # The pipeline's own waiting line, as its model exports it (serving/core/metrics.py).
    from serving.core.metrics import METRICS

    assert "ldm_queue_length" in metric_names
    series = rules["ldm_queue_length"]["seriesQuery"].split("{")[0].strip("'")
    assert series in {name for name, _, kind, _ in METRICS if kind == "gauge"}
    # The Triton ratio: HPA <- adapter rule <- recording rule <- Triton's counters.
    series = rules["ldm_triton_queue_to_compute_ratio"]["seriesQuery"].split("{")[0].strip("'")
    recording = [r for g in _one(objs, "PrometheusRule")["spec"]["groups"] for r in g["rules"]]
    expr = next(r["expr"] for r in recording if r["record"] == series)
    assert "nv_inference_queue_duration_us" in expr and "nv_inference_compute_infer_duration_us" in expr
    assert "by (namespace, pod)" in expr


# --- hygiene over every object --------------------------------------------------------------


@pytest.mark.parametrize("target", OVERLAYS + ["monitoring"])
def test_no_latest_tags_no_inline_secrets_right_namespace(objects, target):
    expected_ns = "monitoring" if target == "monitoring" else NAMESPACE
    for obj in objects[target]:
        assert obj["kind"] != "Secret", "secrets are referenced, never committed"
        if obj["kind"] not in CLUSTER_SCOPED:
            assert obj["metadata"].get("namespace") == expected_ns, (obj["kind"], obj["metadata"]["name"])
        spec = obj.get("spec", {}).get("template", {}).get("spec", {})
        for c in spec.get("containers", []) + spec.get("initContainers", []):
            image = c["image"]
            assert re.fullmatch(r"[\w./-]+:[\w.-]+(@sha256:[0-9a-f]{64})?", image), image
            assert not image.endswith(":latest") and ":latest@" not in image, image
            for env in c.get("env", []):
                # (a *_FILE variable names where a secret is, not the secret)
                if re.search(r"KEY|TOKEN|PASSWORD|SECRET|CREDENTIAL", env["name"], re.I) and not env["name"].endswith(
                    "_FILE"
                ):
                    assert "value" not in env, f"{env['name']} must come from a Secret (valueFrom)"
        text = json.dumps(obj)
        assert not re.search(r"-----BEGIN [A-Z ]*PRIVATE KEY-----|AKIA[0-9A-Z]{16}", text)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateways_reach_the_pod_that_runs_a_live_generation(objects, overlay):
    """A steer or DELETE of a live generation is forwarded to the pod named in its id: each
    gateway is named after its pod and finds the others at <pod>.<subdomain>.<namespace>.svc,
    which a headless Service of that name provides, for draining pods too; the network policy
    lets the pods' gateways reach each other's REST port."""
    objs = objects[overlay]
    spec = _pod_spec(objs)
    gateway = _container(objs, "gateway")
    args = dict(a.removeprefix("--").split("=", 1) for a in gateway["args"][1:])
    env = {e["name"]: e for e in gateway["env"]}
    assert (
        args["replica-name"] == "$(POD_NAME)"
        and env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    )
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    peers = _one(objs, "Service", spec["subdomain"])
    assert args["peer-domain"] == f"{spec['subdomain']}.$(POD_NAMESPACE).svc.cluster.local"
    assert peers["spec"]["clusterIP"] == "None" and peers["spec"]["publishNotReadyAddresses"] is True
    assert [(p["name"], p["port"]) for p in peers["spec"]["ports"]] == [("rest", int(args["rest-port"]))]
    pod_labels = _one(objs, "Deployment", "ldm-triton")["spec"]["template"]["metadata"]["labels"]
    policy = _one(objs, "NetworkPolicy")["spec"]
    for rules, side in ((policy["ingress"], "from"), (policy["egress"], "to")):
        assert any(
            any(_matches(peer.get("podSelector", {}).get("matchLabels", {"-": "-"}), pod_labels) for peer in rule[side])
            and {p["port"] for p in rule["ports"]} == {"rest"}
            for rule in rules
        ), side
