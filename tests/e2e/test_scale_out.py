"""Scale-out: two API replicas behind nginx, one killed under load (docker/docker-compose.scale.yml).

Real processes on loopback: two `python -m service` replicas serving a tiny BERT, and Debian's nginx
with the very location block of docker/nginx.conf.template (the compose overlay's proxy). Only the
addresses differ: compose's `server api:PORT` (Docker's DNS answers one address per replica)
becomes one `server` line per replica, with the same parameters, and nginx listens on a free
loopback port instead of 8080. Skipped, saying why, where nginx is not installed
(`make test-container` installs it: tests/e2e/install_nginx.sh).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.service.service_helpers import ServerProcess, build_tiny_bert, free_port, wait_until

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
NGINX_TEMPLATE = ROOT / "docker" / "nginx.conf.template"
NGINX = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.access(p, os.X_OK)), None)

# How many requests may fail while nginx notices that a replica is gone. With proxy_next_upstream
# covering connection errors for POSTs, none should: a refused or reset connection is retried on
# the other replica. One is allowed for a response cut off after its first bytes (never retried).
MAX_FAILED_DURING_SWITCH = 1
FAIL_TIMEOUT_S = 10  # the template's `fail_timeout=10s`: how long a failed replica is left alone


def render_template(template: str, env: dict[str, str]) -> str:
    """What the nginx image's envsubst step does: replace ${NAME} for the given names only."""
    return re.sub(r"\$\{(\w+)\}", lambda m: env.get(m.group(1), m.group(0)), template)


def loopback_config(template: str, replica_ports: list[int], listen_port: int, prefix: Path) -> str:
    """A whole nginx.conf around the rendered template, pointed at loopback replicas."""
    site = render_template(template, {"HF_SERVE_PORT": "8000", "PROXY_MAX_BODY": "64m"})
    server_line = re.search(r"^(\s*)server api:8000( [^;]*)?;$", site, flags=re.M)
    assert server_line, "docker/nginx.conf.template no longer has `server api:${HF_SERVE_PORT} ...;`"
    assert f"fail_timeout={FAIL_TIMEOUT_S}s" in server_line.group(0)
    indent, params = server_line.group(1), server_line.group(2) or ""
    servers = "\n".join(f"{indent}server 127.0.0.1:{port}{params};" for port in replica_ports)
    site = site[: server_line.start()] + servers + site[server_line.end():]
    assert "listen 8080;" in site
    site = site.replace("listen 8080;", f"listen 127.0.0.1:{listen_port};")
    temp = "\n".join(f"    {kind}_temp_path {prefix / kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    # `user` only means something when nginx starts as root (its workers would otherwise be nobody,
    # who cannot enter pytest's private tmp folders).
    user = "user root;\n" if os.geteuid() == 0 else ""
    return (
        f"{user}worker_processes 1;\npid {prefix / 'nginx.pid'};\nerror_log {prefix / 'error.log'} warn;\n"
        f"events {{ worker_connections 256; }}\n"
        f"http {{\n    access_log off;\n{temp}\n{site}\n}}\n"
    )


@dataclass
class Load:
    """Clients POSTing to the proxy in a loop, each outcome stamped with the time it ended."""

    url: str
    clients: int = 4
    outcomes: list[tuple[float, str]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as client:
            while not self.stop.is_set():
                try:
                    response = client.post("/models/sentiment", json={"inputs": "a fine film"})
                    ok = response.status_code == 200 and response.json()[0][0]["label"] in ("negative", "positive")
                    outcome = "ok" if ok else f"HTTP {response.status_code}"
                except httpx.HTTPError as exc:
                    outcome = type(exc).__name__
                self.outcomes.append((time.monotonic(), outcome))

    def __enter__(self) -> Load:
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(self.clients)]
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=60)


def served_ok(url: str) -> float:
    """hf_serve_requests_total{model="sentiment",status="200"} of one replica."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    match = re.search(r'^hf_serve_requests_total\{model="sentiment",status="200"\} (\S+)$', text, flags=re.M)
    return float(match.group(1)) if match else 0.0


def answers(url: str, path: str = "/ready") -> bool:
    try:
        return httpx.get(f"{url}{path}", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


@pytest.fixture
def proxy_and_replicas(tmp_path):
    if NGINX is None:
        pytest.skip("nginx is not installed (apt-get install nginx): needed for the scale-out failover test")
    models = tmp_path / "models"
    build_tiny_bert(models / "sentiment", labels=["negative", "positive"])
    prefix = tmp_path / "nginx"
    prefix.mkdir()
    flags = ("--reload-interval-s", "0", "--torch-threads", "1")
    with contextlib.ExitStack() as stack:
        replicas = []
        for _ in range(2):  # both load at once; each is stopped (or killed) however the test ends
            replica = ServerProcess(models, *flags)
            stack.callback(replica.__exit__, None, None, None)
            replicas.append(replica)
        for replica in replicas:  # not ServerProcess's own 60 s wait: a busy 2-core machine needs longer
            wait_until(lambda r=replica: answers(r.url) or r.proc.poll() is not None, 180, "replica did not start", every=0.05)
            assert replica.proc.poll() is None, "a replica exited while starting"
        port = free_port()
        conf = prefix / "nginx.conf"
        conf.write_text(loopback_config(NGINX_TEMPLATE.read_text(), [r.port for r in replicas], port, prefix))
        test = subprocess.run([NGINX, "-t", "-p", str(prefix), "-c", str(conf)], capture_output=True, text=True)
        assert test.returncode == 0, test.stderr
        nginx = subprocess.Popen([NGINX, "-p", str(prefix), "-c", str(conf), "-g", "daemon off;"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        stack.callback(nginx.wait, 15)
        stack.callback(nginx.terminate)
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: answers(url, "/health"), 15, "nginx did not answer /health", every=0.05)
        yield url, *replicas


@pytest.mark.parametrize("replicas", [1, 3])
def test_template_renders_to_a_config_nginx_accepts(tmp_path, replicas):
    """`nginx -t` on the template as the proxy service renders it (fast: no replica needs to run)."""
    if NGINX is None:
        pytest.skip("nginx is not installed (apt-get install nginx)")
    conf = tmp_path / "nginx.conf"
    conf.write_text(loopback_config(NGINX_TEMPLATE.read_text(), [free_port() for _ in range(replicas)], free_port(), tmp_path))
    result = subprocess.run([NGINX, "-t", "-p", str(tmp_path), "-c", str(conf)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "${" not in conf.read_text()  # every placeholder is one the proxy service sets


# Outside `make test` (`make test-container`): the two replicas take 10-30 s to load and serve on an
# idle 2-core machine, minutes on a busy one.
@pytest.mark.container
def test_requests_keep_being_answered_when_a_replica_dies(proxy_and_replicas):
    url, first, second = proxy_and_replicas
    with Load(url) as load:
        # Both replicas take traffic (round robin) before one dies.
        wait_until(lambda: served_ok(first.url) >= 20 and served_ok(second.url) >= 20, 60, "replicas not both serving", every=0.05)
        second_before = served_ok(second.url)
        first.proc.kill()  # SIGKILL: no drain, connections reset, the port refuses from now on
        killed_at = time.monotonic()
        first.proc.wait(timeout=10)
        # Keep the load going past the template's fail_timeout (10 s), after which nginx tries the
        # dead replica again: those retries must not fail either.
        wait_until(lambda: sum(1 for t, o in load.outcomes if t > killed_at + FAIL_TIMEOUT_S + 2 and o == "ok") >= 20,
                   120, "no steady stream of answers after the kill", every=0.05)
    before = [o for t, o in load.outcomes if t <= killed_at]
    after = [o for t, o in load.outcomes if t > killed_at]
    failed = [o for o in after if o != "ok"]
    switch = [o for t, o in load.outcomes if killed_at < t <= killed_at + 1.0]
    print(f"\nfailover: {len(before)} requests before the kill ({before.count('ok')} ok), "
          f"{len(after)} after ({len(failed)} failed: {sorted(set(failed))}), "
          f"{len(switch)} in the first second after it")
    assert before and all(o == "ok" for o in before), sorted(set(before))
    assert len(failed) <= MAX_FAILED_DURING_SWITCH, failed
    # Everything answered after the kill came from the survivor.
    assert served_ok(second.url) - second_before >= len(after) - len(failed)
