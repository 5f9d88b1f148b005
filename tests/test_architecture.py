"""The package and its layers, as a user installs them: one top-level name (``batchmax``),
the wheel working in a fresh virtual environment, server -> engine -> policies with no arrow
upwards and no benchmark or test imported by the product (import-linter), ruff clean, and no
file that points outside the repository."""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=kw.pop("timeout", 600), **kw)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # --no-build-isolation: the build backend is this environment's setuptools (no download)
    r = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(REPO)])
    assert r.returncode == 0, r.stdout + r.stderr
    (whl,) = out.glob("batchmax-*.whl")
    return whl


@pytest.fixture(scope="module")
def unpacked(wheel, tmp_path_factory) -> Path:
    site = tmp_path_factory.mktemp("site")
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    return site


def test_wheel_has_one_top_level_name(wheel):
    with zipfile.ZipFile(wheel) as z:
        tops = {n.split("/")[0] for n in z.namelist()}
        top_level = {t for t in tops if not t.endswith(".dist-info")}
        assert top_level == {"batchmax"}, tops
        names = set(z.namelist())
    for mod in ("batchmax/__init__.py", "batchmax/engine/llm.py", "batchmax/engine/models/llama.py",
                "batchmax/server/cli.py", "batchmax/policies/snapkv.py"):
        assert mod in names
    assert not any(n.startswith(("batchmax/bench", "batchmax/tests")) for n in names)
    # every module of the product's folders is in the wheel: a subpackage missing from
    # pyproject's ``packages`` would import in the checkout and fail once installed
    for folder, pkg in (("engine", "batchmax/engine"), ("server", "batchmax/server"), ("policies", "batchmax/policies")):
        for src in (REPO / folder).rglob("*.py"):
            if "__pycache__" not in src.parts:
                assert f"{pkg}/{src.relative_to(REPO / folder).as_posix()}" in names, f"{src} is not in the wheel"


@pytest.mark.slow
def test_wheel_in_fresh_venv(wheel, tmp_path):
    """A new virtual environment gets only the wheel; its dependencies come from this one's
    site-packages (a .pth line: no network), whose editable install is not active there."""
    venv = tmp_path / "venv"
    r = _run([sys.executable, "-m", "venv", str(venv)])
    assert r.returncode == 0, r.stderr
    py = venv / "bin" / "python"
    site = _run([str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]).stdout.strip()
    deps = [p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()]
    (Path(site) / "deps.pth").write_text("\n".join(deps) + "\n")
    r = _run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)])
    assert r.returncode == 0, r.stdout + r.stderr
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    r = _run([str(venv / "bin" / "batchmax"), "--help"], cwd=tmp_path, env=env)
    assert r.returncode == 0 and "serve" in r.stdout, r.stdout + r.stderr
    r = _run([str(py), "-c", "import batchmax; from batchmax import LLM, SamplingParams; print(batchmax.__file__, LLM.__module__)"],
             cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    where, module = r.stdout.split()
    assert Path(where).is_relative_to(venv) and module == "batchmax.engine.llm"


def _lint_imports(site: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(site))
    cli = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    return _run([sys.executable, "-c", cli, str(REPO / "pyproject.toml"), "--no-cache"], cwd=site, env=env)


def test_source_checkout_imports_with_no_install():
    """From the checkout's root, with no install of batchmax in sight (no site hooks, so no
    editable finder; torch's folder alone on the path), the namespace still maps its parts to
    the top-level folders: how the GPU machine runs the benchmarks."""
    import torch

    env = dict(os.environ, PYTHONPATH=str(Path(torch.__file__).resolve().parents[1]))
    code = ("import batchmax, batchmax.engine, batchmax.policies, batchmax.server.cli, bench.engine_steps; "
            "print(batchmax.engine.__file__, batchmax.policies.__file__)")
    r = _run([sys.executable, "-S", "-c", code], cwd=REPO, env=env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.split() == [str(REPO / "engine" / "__init__.py"), str(REPO / "policies" / "__init__.py")]


def test_layers_contract(unpacked):
    r = _lint_imports(unpacked)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Contracts: 2 kept, 0 broken." in r.stdout, r.stdout


def test_layers_contract_catches_an_upward_import(unpacked, tmp_path):
    """The checker is live: a policy that imports the server, and an engine module that
    imports a benchmark, each break a contract."""
    import shutil

    site = tmp_path / "site"
    shutil.copytree(unpacked, site)
    (site / "batchmax" / "policies" / "probe.py").write_text("import batchmax.server.routes\n")
    (site / "batchmax" / "engine" / "probe.py").write_text("import bench.workload\n")
    r = _lint_imports(site)
    assert r.returncode != 0
    assert "Contracts: 0 kept, 2 broken." in r.stdout, r.stdout


def test_ruff_clean():
    r = _run([sys.executable, "-m", "ruff", "check", "--no-cache", str(REPO)], cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr


def test_no_file_points_outside_the_repository():
    """The architecture lives in docs/ARCHITECTURE.md; nothing cites ../shared (which no
    user's clone has). Results pages are dated records and keep what they said then."""
    files = _run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO).stdout.split()
    bad = []
    for rel in files:
        if rel.startswith("bench/results/") or rel == "tests/test_architecture.py":
            continue
        p = REPO / rel
        try:
            text = p.read_text()
        except (UnicodeDecodeError, OSError):
            continue
        for needle in ("../shared", "DESIGN.md"):
            if needle in text:
                bad.append(f"{rel}: {needle}")
    assert not bad, bad
    assert (REPO / "docs" / "ARCHITECTURE.md").is_file()
