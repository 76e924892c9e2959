"""The built image, run with podman (`make test-container`; marker `container`, outside `make test`:
it needs podman, the CPU image from `make image-cpu` and a few minutes).

Each test runs the real image (hf-finetune-serve:cpu, or $HF_IMAGE) as its non-root user, the way
docker-compose.yml runs it: --init (tini/catatonit as PID 1), the models folder mounted read-only,
the image's own HEALTHCHECK. Two flags are this machine's, not the image's (docs/deployment.md):
--runtime runc (crun refuses the hybrid cgroup v1 + v2 layout here) and --ulimit values within the
host's hard limits (podman's defaults are above them and raising needs CAP_SYS_RESOURCE).
--network host with the server on a free loopback port keeps every request on 127.0.0.1.

Podman runs health checks from systemd timers; with no systemd here the tests run
`podman healthcheck run`, which is what each timer tick does (the check, the status, and the
--health-on-failure action).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

import httpx
import pytest
import yaml

from tests.scores import assert_scores_close
from tests.service.service_helpers import build_tiny_bert, free_port, wait_until

pytestmark = pytest.mark.container
IMAGE = os.environ.get("HF_IMAGE", "hf-finetune-serve:cpu")
PODMAN = shutil.which("podman")
APP_UID = 1000  # the Dockerfile's default APP_UID / APP_GID
COMPOSE = Path(__file__).resolve().parents[2] / "docker-compose.yml"


def _host_limits() -> list[str]:
    """--ulimit flags no higher than this process's hard limits (podman caps nproc at 32768 itself)."""
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nproc = min(resource.getrlimit(resource.RLIMIT_NPROC)[1], 32768)
    return [f"--ulimit=nofile={nofile}:{nofile}", f"--ulimit=nproc={nproc}:{nproc}"]


def podman(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    result = subprocess.run([PODMAN, *args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} -> {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


def inspect(name: str, template: str) -> str:
    return podman("inspect", "--format", template, name).stdout.strip()


def answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/ready", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def server_pid(name: str) -> int:
    """Host pid of hf-serve: the one child of the container's init (catatonit, from --init)."""
    init = int(inspect(name, "{{.State.Pid}}"))
    children = Path(f"/proc/{init}/task/{init}/children").read_text().split()
    assert len(children) == 1, children
    pid = int(children[0])
    assert "hf-serve" in Path(f"/proc/{pid}/cmdline").read_text(), Path(f"/proc/{pid}/cmdline").read_text()
    return pid


@pytest.fixture(scope="module")
def image() -> str:
    if PODMAN is None:
        pytest.skip("podman is not installed: `make image-cpu` installs it and builds the image")
    if os.geteuid() != 0:  # rootless podman would map the container's uid 1000 to another host uid
        pytest.skip("the container tests run rootful podman (as root, as `make image-cpu` builds)")
    if podman("image", "exists", IMAGE, check=False).returncode != 0:
        pytest.skip(f"image {IMAGE} is not built: run `make image-cpu`")
    return IMAGE


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """A models folder with one tiny classifier, readable by the container's user."""
    root = tmp_path_factory.mktemp("container-models")
    build_tiny_bert(root / "sentiment", labels=["negative", "positive"])
    for path in [root, *root.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return root


class Container:
    """One `podman run -d` of the image serving `models` on a free loopback port."""

    def __init__(self, image: str, models: Path, *flags: str):
        self.name = f"hf-test-{uuid.uuid4().hex[:8]}"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        podman("run", "-d", "--name", self.name, "--runtime", "runc", *_host_limits(), "--init",
               "--network", "host", "-e", "HF_SERVE_HOST=127.0.0.1", "-e", f"HF_SERVE_PORT={self.port}",
               "-e", "HF_SERVE_RELOAD_INTERVAL_S=0", "-e", "HF_HUB_OFFLINE=1",
               "-v", f"{models}:/app/models:ro", *flags, image)

    def __enter__(self) -> Container:
        wait_until(lambda: answers(self.url) or self.state() == "exited", 180, "the server did not start")
        assert self.state() == "running", self.logs()
        return self

    def __exit__(self, *exc) -> None:
        podman("rm", "-f", "-t", "0", self.name, check=False)

    def state(self) -> str:
        return inspect(self.name, "{{.State.Status}}")

    def logs(self) -> str:
        result = podman("logs", self.name, check=False)
        return result.stdout + result.stderr

    def healthcheck(self) -> int:
        """One health check tick, as podman's timer would run it: the image's HEALTHCHECK command."""
        return podman("healthcheck", "run", self.name, check=False, timeout=60).returncode


def test_image_keeps_its_healthcheck_and_runs_as_non_root(image):
    info = json.loads(podman("image", "inspect", image).stdout)[0]
    # Docker's format: the OCI image config has no field for HEALTHCHECK, so --format oci drops it.
    assert "docker" in info["ManifestType"]
    assert info["Healthcheck"]["Test"] == ["CMD", "python", "/app/docker/healthcheck.py"]
    config = info["Config"]
    assert config["User"] == f"{APP_UID}:{APP_UID}"
    assert config["Entrypoint"] == ["/app/docker/entrypoint.sh"] and config["Cmd"] == ["serve"]
    torch_build = podman("run", "--rm", "--runtime", "runc", *_host_limits(), image,
                         "python", "-c", "import torch; print(torch.__version__, torch.version.cuda)").stdout
    assert torch_build.split() == ["2.13.0+cpu", "None"], torch_build


def test_serves_a_read_only_model_as_non_root(image, models):
    from transformers import pipeline

    texts = ["a fine film", "a dull one"]
    with Container(image, models) as box, httpx.Client(base_url=box.url, timeout=30) as client:
        assert client.get("/health").status_code == 200
        response = client.post("/models/sentiment", json={"inputs": texts})
        assert response.status_code == 200, response.text
        # The image's CPU torch computes what this machine's does, from the same folder.
        expected = pipeline("text-classification", model=str(models / "sentiment"), top_k=None)(texts)
        assert_scores_close(response.json(), expected)
        assert box.healthcheck() == 0
        assert inspect(box.name, "{{.State.Health.Status}}") == "healthy"
        status = Path(f"/proc/{server_pid(box.name)}/status").read_text()
        uids = next(line.split()[1:] for line in status.splitlines() if line.startswith("Uid:"))
        assert uids == [str(APP_UID)] * 4, uids  # the server itself runs as the image's user
        write = podman("exec", box.name, "touch", "/app/models/sentiment/x", check=False)
        assert write.returncode != 0 and "Read-only file system" in write.stderr


def test_serves_on_the_onnx_backend(image, models, tmp_path):
    """The image carries the `onnx` extra: HF_SERVE_BACKEND=onnx exports the read-only folder into the
    cache volume (as docker-compose.yml mounts it) and answers what torch does."""
    from transformers import pipeline

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    os.chown(cache, APP_UID, APP_UID)
    texts = ["a fine film", "a dull one"]
    with Container(image, models, "-e", "HF_SERVE_BACKEND=onnx", "-e", "HF_SERVE_ONNX_CACHE=/hf-cache/onnx",
                   "-v", f"{cache}:/hf-cache") as box, httpx.Client(base_url=box.url, timeout=30) as client:
        response = client.post("/models/sentiment", json={"inputs": texts})
        assert response.status_code == 200, response.text
        expected = pipeline("text-classification", model=str(models / "sentiment"), top_k=None)(texts)
        assert_scores_close(response.json(), expected)
        assert "served by ONNX Runtime" in box.logs(), box.logs()[-3000:]
        assert list(cache.rglob("*.onnx")), "no ONNX file in the cache volume"


def test_sigterm_drains_and_exits_0(image, models):
    """`podman stop` (SIGTERM) with a request whose body is still arriving: it is answered, then the
    container exits 0."""
    with Container(image, models) as box:
        body = json.dumps({"inputs": "drain me"}).encode()
        upload = socket.create_connection(("127.0.0.1", box.port), timeout=60)
        upload.sendall(f"POST /models/sentiment HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:5])
        time.sleep(0.5)  # headers parsed, the body being read: in flight for certain
        stop = subprocess.Popen([PODMAN, "stop", "-t", "30", box.name], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        wait_until(lambda: "Shutting down" in box.logs(), 30, "the server did not get SIGTERM")
        upload.sendall(body[5:])
        data = b""
        while chunk := upload.recv(65536):
            data += chunk
        upload.close()
        stop.communicate(timeout=60)
        head, _, payload = data.partition(b"\r\n\r\n")
        assert head.split()[1] == b"200", data[:500]
        assert len(json.loads(payload)[0]) == 2
        assert box.state() == "exited"
        assert inspect(box.name, "{{.State.ExitCode}}") == "0", box.logs()[-2000:]
        assert "Finished server process" in box.logs()


def test_a_killed_server_exits_the_container_and_restart_brings_it_back(image, models):
    with Container(image, models, "--restart", "on-failure") as box:
        killed = server_pid(box.name)
        os.kill(killed, signal.SIGKILL)
        wait_until(lambda: int(inspect(box.name, "{{.RestartCount}}")) >= 1, 60, "the container was not restarted")
        wait_until(lambda: answers(box.url), 180, "the restarted server did not answer")
        assert server_pid(box.name) != killed
        response = httpx.post(f"{box.url}/models/sentiment", json={"inputs": "back again"}, timeout=30)
        assert response.status_code == 200


def compose_healthcheck() -> list[str]:
    """The api service's healthcheck command in docker-compose.yml (exec form, without "CMD")."""
    test = yaml.safe_load(COMPOSE.read_text())["services"]["api"]["healthcheck"]["test"]
    assert test[0] == "CMD", test
    return test[1:]


def test_a_hung_server_turns_unhealthy_and_is_restarted(image, models):
    """SIGSTOP: the process lives but answers nothing. The health check fails (its own 4 s timeout);
    after --health-retries failures in a row the container is unhealthy and --health-on-failure=restart
    restarts it. The check is compose's (the image's command, with a short interval and no start
    period): podman 4.3 takes --health-* timings only along with --health-cmd."""
    flags = ("--health-cmd", json.dumps(compose_healthcheck()), "--health-on-failure", "restart",
             "--health-retries", "2", "--health-timeout", "10s", "--health-start-period", "0s",
             "--health-interval", "10s")
    with Container(image, models, *flags) as box:
        assert box.healthcheck() == 0
        started = inspect(box.name, "{{.State.StartedAt}}")
        hung = server_pid(box.name)
        os.kill(hung, signal.SIGSTOP)
        assert box.healthcheck() != 0
        # One failure is not enough to act on.
        assert inspect(box.name, "{{.State.Health.Status}} {{.State.Health.FailingStreak}}") == "healthy 1"
        assert inspect(box.name, "{{.State.StartedAt}}") == started
        assert box.healthcheck() != 0  # the second one in a row: unhealthy, restart
        assert inspect(box.name, "{{.State.StartedAt}}") != started
        assert not Path(f"/proc/{hung}").exists()  # the hung process is gone (SIGKILL after the stop timeout)
        wait_until(lambda: answers(box.url), 180, "the restarted server did not answer")
        assert box.healthcheck() == 0
        assert inspect(box.name, "{{.State.Health.Status}}") == "healthy"


def test_train_entrypoint_fine_tunes_into_a_mounted_folder(image, tmp_path):
    base = build_tiny_bert(tmp_path / "base" / "tiny-bert")
    data = tmp_path / "data"
    data.mkdir()
    rows = [("a fine, moving film", "positive"), ("dull and far too long", "negative")] * 16
    (data / "train.csv").write_text("text,label\n" + "".join(f'"{t}",{y}\n' for t, y in rows))
    out, runs = tmp_path / "models", tmp_path / "runs"
    for path in [tmp_path, *tmp_path.rglob("*")]:  # readable by the container's user
        path.chmod(0o755 if path.is_dir() else 0o644)
    for folder in (out, runs):  # and these writable by it, as `APP_UID=$(id -u)` builds arrange
        folder.mkdir()
        os.chown(folder, APP_UID, APP_UID)
    result = podman("run", "--rm", "--runtime", "runc", *_host_limits(), "--init",
                    "-e", "HF_HUB_OFFLINE=1", "-e", "HF_DATASETS_OFFLINE=1",
                    "-e", "ACCELERATE_LAUNCH_ARGS=--cpu --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no",
                    "-v", f"{base.parent}:/app/base:ro", "-v", f"{data}:/app/data:ro",
                    "-v", f"{out}:/app/models", "-v", f"{runs}:/app/runs",
                    image, "train", "--model_name_or_path", "/app/base/tiny-bert",
                    "--train_file", "data/train.csv", "--max_train_steps", "3", "--per_device_train_batch_size", "8",
                    "--output_dir", "models/tiny-sentiment", check=False, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    model = out / "tiny-sentiment"
    assert (model / "model.safetensors").is_file()
    config = json.loads((model / "config.json").read_text())
    assert sorted(config["id2label"].values()) == ["negative", "positive"]
    assert (runs / "tiny-sentiment" / "checkpoints").is_dir()
    assert (model / "model.safetensors").stat().st_uid == APP_UID  # written by the image's user
