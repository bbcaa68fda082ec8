"""The container image and the Compose file.

The image is built for real — on a base made here from the machine's own Debian packages
(``debootstrap``, then ``docker import``: no image registry is reachable from our machines),
by a Docker daemon this module starts itself (Debian's ``docker.io``, host networking
only) — and run on loopback: it answers, it proxies, it runs as non-root, its HEALTHCHECK
passes, and ``docker stop`` drains a request in flight and keeps its access-log line.
Package downloads inside the build get the machine's CA certificates and pip settings as
build secrets, never as files of the repository or layers of the image.

The Dockerfile's and compose.yaml's promises are also read without a daemon."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tarfile
import threading
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import wait_until, STRICT, require_tool
from tests.servers import ROOT, TEST_JWT_SECRET, free_port, session, wait_for_port

DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "compose.yaml"
IMAGE = "meetinity-gateway-test:latest"


# -- read without a daemon --------------------------------------------------------------------

def dockerfile_stages(text: str) -> list[list[tuple[str, str]]]:
    """The Dockerfile's instructions (continuations joined, comments dropped) by stage."""
    joined = re.sub(r"\\\n", " ", text)
    stages: list[list[tuple[str, str]]] = []
    for line in joined.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        if word.upper() == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((word.upper(), rest.strip()))
    return stages


def test_dockerfile_final_stage_is_lean_non_root_and_drains():
    stages = dockerfile_stages(DOCKERFILE.read_text(encoding="utf-8"))
    assert len(stages) == 2  # a build stage, and the image that ships
    final = stages[-1]
    instructions = {word: rest for word, rest in final}
    assert instructions["FROM"] == "${PYTHON_IMAGE}"
    assert instructions["USER"] not in ("root", "0")
    assert instructions["STOPSIGNAL"] == "SIGTERM"
    assert "/health/live" in instructions["HEALTHCHECK"]
    # Nothing is installed or compiled in the final stage: it only copies the virtualenv.
    runs = [rest for word, rest in final if word == "RUN"]
    assert runs and not any(re.search(r"\b(pip|apt-get|apt|gcc|make|build)\b", run)
                            for run in runs), runs
    copies = [rest for word, rest in final if word == "COPY"]
    assert copies and all(rest.startswith("--from=build ") for rest in copies)
    # Secrets are mounted for the install step only, never copied.
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert "--mount=type=secret,id=ca" in text and "ca-certificates.crt /" not in text
    assert "# syntax=" not in text  # a frontend image would be pulled from a registry


def test_dockerignore_keeps_secrets_and_the_developer_tree_out():
    rules = (ROOT / ".dockerignore").read_text(encoding="utf-8").split()
    assert rules[rules.index("*") if "*" in rules else 0] == "*"  # everything out first
    allowed = {rule[1:].rstrip("/") for rule in rules if rule.startswith("!")}
    assert ".env" not in allowed and ".venv" not in allowed and "tests" not in allowed
    assert {"meetinity_gateway", "setup.cfg", "gateway.ini", "LICENSE"} <= allowed


def test_compose_has_two_replicas_sharing_one_redis():
    compose = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    services = compose["services"]
    gateway = services["gateway"]
    assert gateway["deploy"]["replicas"] == 2
    env = gateway["environment"]
    assert env["RATELIMIT_STORAGE_URI"] == "redis://redis:6379/0"
    assert env["RATELIMIT_PROCESSES"] == str(gateway["deploy"]["replicas"])
    assert "redis" in services and gateway["depends_on"]["redis"]["condition"] == \
        "service_healthy"
    # The drain (GATEWAY_DRAIN_SECONDS, 20) fits in the grace period.
    grace = int(gateway["stop_grace_period"].rstrip("s"))
    assert grace > 20
    # Every Meetinity service is a placeholder the operator points at, started on request.
    for name in ("user-service", "event-service", "matching-service", "messaging-service"):
        assert services[name]["profiles"] == ["platform"]
    assert env["JWT_SECRET"].startswith("${JWT_SECRET:?")  # never a default secret
    text = COMPOSE.read_text(encoding="utf-8")
    assert not re.search(r"image:\s*[\w.-]+\.[a-z]{2,}(:\d+)?/", text)  # no registry host


def kubernetes_recipe() -> dict[str, dict]:
    """The YAML block after the ``kubernetes-recipe`` marker of docs/scale-out.md, by kind."""
    text = (ROOT / "docs" / "scale-out.md").read_text(encoding="utf-8")
    block = re.search(r"<!-- kubernetes-recipe -->\s*```yaml\n(.*?)```", text, flags=re.S)
    assert block, "docs/scale-out.md lost its Kubernetes recipe"
    documents = [d for d in yaml.safe_load_all(block.group(1)) if d]
    by_kind = {document["kind"]: document for document in documents}
    assert len(by_kind) == len(documents)
    return by_kind


def test_kubernetes_recipe_holds_together():
    recipe = kubernetes_recipe()
    assert set(recipe) == {"ConfigMap", "Secret", "Deployment", "Service"}
    config, secret = recipe["ConfigMap"], recipe["Secret"]
    deployment, service = recipe["Deployment"], recipe["Service"]
    assert all(isinstance(value, str) for value in config["data"].values())
    assert "JWT_SECRET" in secret["stringData"] and "JWT_SECRET" not in config["data"]
    spec = deployment["spec"]
    labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"] == labels
    assert service["spec"]["selector"] == labels
    [container] = spec["template"]["spec"]["containers"]
    sources = {next(iter(ref)): ref[next(iter(ref))]["name"] for ref in container["envFrom"]}
    assert sources == {"configMapRef": config["metadata"]["name"],
                       "secretRef": secret["metadata"]["name"]}
    # The port the gateway listens on is the one probed and served.
    [port] = container["ports"]
    assert config["data"]["GATEWAY_LISTEN"].rsplit(":", 1)[1] == str(port["containerPort"])
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health/live", "port": port["name"]}
    assert service["spec"]["ports"][0]["targetPort"] == port["name"]
    # Shared budgets, each process' share right, a drain that fits, no root.
    assert not config["data"]["RATELIMIT_STORAGE_URI"].startswith("memory")
    assert config["data"]["RATELIMIT_PROCESSES"] == str(spec["replicas"]) and spec["replicas"] > 1
    assert spec["template"]["spec"]["terminationGracePeriodSeconds"] > 20
    assert spec["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    # Every variable it sets is one the shipped gateway.ini reads.
    shipped = (ROOT / "gateway.ini").read_text(encoding="utf-8")
    for name in config["data"]:
        assert "${" + name + ":-" in shipped or "${" + name + "}" in shipped, name


# -- built and run for real ---------------------------------------------------------------------

def _unavailable(message: str):
    if STRICT:
        pytest.fail(message + " — MEETINITY_STRICT_SKIPS=1 forbids skipping", pytrace=False)
    pytest.skip(message)


def _buildkit_client() -> str:
    """A docker client that builds with BuildKit by itself (build secrets), as Debian's
    docker.io has: a newer client on PATH may need the buildx plugin instead."""
    for folder in os.environ.get("PATH", "").split(os.pathsep) + ["/usr/bin"]:
        candidate = Path(folder) / "docker"
        if not candidate.is_file():
            continue
        result = subprocess.run([str(candidate), "build", "--help"], capture_output=True,
                                text=True, timeout=30, env={**os.environ, "DOCKER_BUILDKIT": "1"})
        if result.returncode == 0 and "--secret" in result.stdout:
            return str(candidate)
    _unavailable("no docker client here builds with BuildKit (.ci/run installs docker.io)")


def _machine_sources() -> tuple[str, str]:
    """(suite, mirror) of the machine's own Debian/Ubuntu apt sources."""
    release = dict(line.split("=", 1) for line in
                   Path("/etc/os-release").read_text().splitlines() if "=" in line)
    suite = release.get("VERSION_CODENAME", "").strip('"')
    texts = [path.read_text() for path in sorted(Path("/etc/apt/sources.list.d").glob("*.sources"))]
    for text in texts:  # deb822: URIs / Suites / Components paragraphs
        for paragraph in text.split("\n\n"):
            fields = dict(re.findall(r"^(\w[\w-]*):\s*(.+)$", paragraph, flags=re.M))
            suites, types = fields.get("Suites", "").split(), fields.get("Types", "").split()
            if "deb" in types and suite in suites:
                return suite, fields["URIs"].split()[0]
    listing = Path("/etc/apt/sources.list")
    if listing.is_file():
        for line in listing.read_text().splitlines():
            # deb [options] URI SUITE COMPONENTS...
            words = re.sub(r"\[[^\]]*\]", " ", line.split("#", 1)[0]).split()
            if len(words) >= 3 and words[0] == "deb" and words[2] == suite:
                return suite, words[1]
    _unavailable("no Debian apt source on this machine to make the base image from")


class DockerDaemon:
    """dockerd with its own data and socket under ``folder``: host networking only (no
    bridge, no iptables rules), stopped and removed afterwards."""

    def __init__(self, dockerd: str, client: str, folder: Path) -> None:
        self.folder = folder
        self.client = client
        self.socket = folder / "docker.sock"
        self.env = {**os.environ, "DOCKER_HOST": f"unix://{self.socket}", "DOCKER_BUILDKIT": "1"}
        self.log = folder / "dockerd.log"
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [dockerd, "--data-root", str(folder / "data"), "--exec-root",
                 str(folder / "exec"), "--pidfile", str(folder / "dockerd.pid"),
                 "--host", f"unix://{self.socket}", "--bridge", "none", "--iptables=false",
                 "--ip6tables=false"], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while self.docker("version", check=False).returncode != 0:
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                _unavailable("a Docker daemon cannot run here: "
                             + self.log.read_text(errors="replace")[-800:])
            time.sleep(0.2)

    def docker(self, *args: str, check: bool = True, timeout: float = 120,
               stdin=None) -> subprocess.CompletedProcess:
        result = subprocess.run([self.client, *args], env=self.env, capture_output=True,
                                timeout=timeout, stdin=stdin)
        if check and result.returncode != 0:
            raise AssertionError(f"docker {' '.join(args)} failed:\n"
                                 + result.stderr.decode(errors="replace")[-3000:])
        return result

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        # dockerd leaves its network namespace mounted (exec-root/netns/default).
        mounts = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
        for point in sorted((m for m in mounts if m.startswith(str(self.folder) + "/")),
                            reverse=True):
            subprocess.run(["umount", "--lazy", point], capture_output=True, timeout=30)
        shutil.rmtree(self.folder / "data", ignore_errors=True)


def _base_rootfs(debootstrap: str) -> Path:
    """A minimal root file system with Python 3 and its venv module, made once with
    debootstrap from the machine's apt sources and kept as a tarball in the user's cache."""
    suite, mirror = _machine_sources()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "meetinity-gateway"
    tarball = cache / f"base-{suite}-python3.tar"
    if tarball.is_file():
        return tarball
    cache.mkdir(parents=True, exist_ok=True)
    root = cache / f"rootfs-{suite}"
    shutil.rmtree(root, ignore_errors=True)
    result = subprocess.run(
        [debootstrap, "--variant=minbase", "--include=python3,python3-venv,ca-certificates",
         suite, str(root), mirror], capture_output=True, text=True, timeout=1200)
    if result.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        raise AssertionError("debootstrap failed:\n" + result.stdout[-2000:] + result.stderr)
    partial = tarball.with_suffix(".partial")
    with tarfile.open(partial, "w") as archive:
        archive.add(str(root), arcname=".")
    partial.rename(tarball)
    shutil.rmtree(root, ignore_errors=True)
    return tarball


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    """(daemon, image name): the image built from this tree on the locally made base."""
    dockerd = require_tool("dockerd", "the container image is built and run for real")
    debootstrap = require_tool("debootstrap", "the image's base is made from Debian packages")
    if os.name != "posix" or os.geteuid() != 0:
        _unavailable("a Docker daemon needs root")
    client = _buildkit_client()
    tarball = _base_rootfs(debootstrap)
    daemon = DockerDaemon(dockerd, client, Path(tmp_path_factory.mktemp("docker")))
    try:
        base = "meetinity-gateway-test-base:local"
        with tarball.open("rb") as stream:
            daemon.docker("import", "-", base, stdin=stream, timeout=600)
        # The machine's CA certificates and pip settings, as build secrets (not in any layer).
        secrets = []
        ca = next((p for p in (os.environ.get("PIP_CERT"), os.environ.get("SSL_CERT_FILE"),
                               "/etc/ssl/certs/ca-certificates.crt") if p and Path(p).is_file()),
                  None)
        if ca:
            secrets += ["--secret", f"id=ca,src={ca}"]
        pip_conf = next((p for p in (os.environ.get("PIP_CONFIG_FILE"), "/etc/pip.conf")
                         if p and Path(p).is_file()), None)
        if pip_conf:
            secrets += ["--secret", f"id=pip.conf,src={pip_conf}"]
        daemon.docker("build", "--network", "host", "--build-arg", f"PYTHON_IMAGE={base}",
                      *secrets, "--tag", IMAGE, str(ROOT), timeout=900)
        yield daemon, IMAGE
    finally:
        daemon.stop()


def _inspect(daemon: DockerDaemon, what: str) -> dict:
    return json.loads(daemon.docker("inspect", what).stdout)[0]


def test_image_answers_proxies_runs_as_non_root_and_drains_on_stop(image, upstream):
    daemon, name = image
    port = free_port()
    # Host networking on loopback: the container's gateway is a loopback server here.
    container = daemon.docker(
        "run", "--detach", "--network", "host", "--stop-timeout", "25",
        "--env", f"JWT_SECRET={TEST_JWT_SECRET}", "--env", f"USER_SERVICE_URL={upstream.url}",
        "--env", f"GATEWAY_LISTEN=127.0.0.1:{port}", name).stdout.decode().strip()
    try:
        wait_for_port("127.0.0.1", port, timeout=60)
        url = f"http://127.0.0.1:{port}"
        with session() as client:
            assert client.get(url + "/health/live", timeout=10).status_code == 200
            echoed = client.get(url + "/api/auth/echo", timeout=10)
            assert echoed.status_code == 200 and echoed.json()["path"] == "/auth/echo"
        # Non-root, inside and as the kernel sees the server process.
        assert daemon.docker("exec", container, "id", "-u").stdout.decode().strip() != "0"
        pid = _inspect(daemon, container)["State"]["Pid"]
        uid = next(line.split()[1] for line in
                   Path(f"/proc/{pid}/status").read_text().splitlines()
                   if line.startswith("Uid:"))
        assert uid != "0"
        # The final image carries no package installer, compiler or source tree.
        probe = daemon.docker("exec", container, "python3", "-c",
                              "import importlib.util as u, os, shutil; print("
                              "u.find_spec('pip') is None, shutil.which('gcc') is None, "
                              "os.path.exists('/src'))").stdout.decode().split()
        assert probe == ["True", "True", "False"]
        # The HEALTHCHECK passes (its first run comes one interval after the start).
        wait_until(lambda: _inspect(daemon, container)["State"]["Health"]["Status"]
                   == "healthy", 60, "the container's HEALTHCHECK passing")

        # docker stop while a request is in flight: it finishes, and is logged.
        answer: dict = {}

        def slow() -> None:
            with session() as client:
                answer["response"] = client.get(url + "/api/auth/slow?seconds=2", timeout=30)

        caller = threading.Thread(target=slow)
        caller.start()
        wait_until(lambda: any("slow" in request[1] for request in upstream.requests), 20)
        daemon.docker("stop", container, timeout=60)
        caller.join(30)
        assert answer["response"].status_code == 200
        state = _inspect(daemon, container)["State"]
        assert state["ExitCode"] == 0  # stopped by itself, not killed after the grace period
        logs = daemon.docker("logs", container)
        lines = (logs.stdout + logs.stderr).decode(errors="replace").splitlines()
        access = [json.loads(line) for line in lines
                  if line.startswith("{") and '"path":"/api/auth/slow"' in line.replace(" ", "")]
        assert [entry["status"] for entry in access] == [200], lines[-20:]
    finally:
        daemon.docker("rm", "--force", container, check=False)
