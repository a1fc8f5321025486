"""tools/wheelhouse.py: the offline wheelhouse of a GPU node, resolved for Python 3.11 and 3.12.

Most tests run pip against a local universe of small wheels (--no-index, no network): one per requirement of the
real setup.py, with a dependency structure that exercises what the tool must get right (Requires-Python of the
target, markers of the target when pip runs on another Python, extras, glibc tags, the node's torch standing in
for the real one, the node's own packages). One test resolves and downloads a small real project from the index
pip is configured with, for both Python versions."""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from helpers import REPO

sys.path.insert(0, str(REPO / "tools"))
import wheelhouse  # noqa: E402

from packaging.requirements import Requirement  # noqa: E402
from packaging.utils import canonicalize_name  # noqa: E402

TOOL = REPO / "tools" / "wheelhouse.py"
PURE = "py3-none-any"


def make_wheel(directory: Path, name: str, version: str, requires: tuple[str, ...] = (), tag: str = PURE,
               requires_python: str | None = None, padding: int = 0) -> Path:
    """A minimal valid wheel of ``name`` (its METADATA, WHEEL, RECORD and ``padding`` bytes of data)."""
    stem = f"{name.replace('-', '_')}-{version}"
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    metadata += f"Requires-Python: {requires_python}\n" if requires_python else ""
    metadata += "".join(f"Requires-Dist: {r}\n" for r in requires)
    files = {f"{stem}.dist-info/METADATA": metadata,
             f"{stem}.dist-info/WHEEL": f"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: {tag}\n",
             f"{name.replace('-', '_')}_data.txt": "x" * padding}
    files[f"{stem}.dist-info/RECORD"] = "".join(f"{m},,\n" for m in [*files, f"{stem}.dist-info/RECORD"])
    path = directory / f"{stem}-{tag}.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for member, text in files.items():
            archive.writestr(member, text)
    return path


def _lowest_version(requirement: str) -> str:
    """A version that satisfies ``requirement`` (its lower bound, or 1.0)."""
    for spec in Requirement(requirement).specifier:
        if spec.operator in (">=", "==", "~="):
            return spec.version
    return "1.0"


@pytest.fixture(scope="module")
def universe(tmp_path_factory) -> Path:
    """A find-links directory: a wheel for every requirement of setup.py, and around them:
    - megatron-core 0.19.2 (Requires-Python >= 3.12) and 0.16.1 (any Python);
    - numpy 2.0.0 for cp311 and cp312 (manylinux_2_17), numpy 2.1.0 for glibc 2.34 only;
    - datasets -> pyarrow (cp311 / cp312 wheels), fsspec[http] (-> aiohttp through the extra),
      tomli on Python < 3.12 only, typing-extensions on Python >= 3.12 only;
    - a real-looking torch 2.11.0 that needs nvidia-cublas (absent: resolving it would fail), and
      transformer-engine / vllm wheels that nothing may download."""
    root = tmp_path_factory.mktemp("universe")
    special = {"megatron-core", "numpy", "datasets", "torch"}
    for requirement in wheelhouse.install_requires(REPO / "setup.py") + list(wheelhouse.BUILD_REQUIREMENTS):
        name = canonicalize_name(Requirement(requirement).name)
        if name not in special:
            make_wheel(root, name, _lowest_version(requirement), padding=1000)
    make_wheel(root, "megatron-core", "0.19.2", ("torch>=2.6.0", "numpy", "packaging>=24.2"),
               requires_python=">=3.12")
    make_wheel(root, "megatron-core", "0.16.1", ("torch>=2.6.0", "numpy", "packaging>=24.2"))
    make_wheel(root, "packaging", "24.2")
    for python in ("cp311", "cp312"):
        make_wheel(root, "numpy", "2.0.0", tag=f"{python}-{python}-manylinux_2_17_x86_64", padding=5000)
        make_wheel(root, "numpy", "2.1.0", tag=f"{python}-{python}-manylinux_2_34_x86_64")
        make_wheel(root, "pyarrow", "20.0", tag=f"{python}-{python}-manylinux_2_28_x86_64", padding=20000)
    make_wheel(root, "datasets", "4.0", ("pyarrow>=15", "numpy>=1.17", "fsspec[http]>=2023.1",
                                         "tomli; python_version < '3.12'",
                                         "typing-extensions>=4.10; python_version >= '3.12'"))
    make_wheel(root, "fsspec", "2025.1", ("aiohttp; extra == 'http'", "requests; extra == 'https'"))
    for name in ("aiohttp", "tomli", "typing-extensions", "requests"):
        make_wheel(root, name, "4.10" if name == "typing-extensions" else "2.0")
    make_wheel(root, "torch", "2.11.0", ("nvidia-cublas-cu12",), tag="cp312-cp312-manylinux_2_28_x86_64")
    make_wheel(root, "transformer-engine", "2.5")
    make_wheel(root, "vllm", "0.25")
    return root


@pytest.fixture
def offline_pip(monkeypatch):
    """pip without this machine's configuration (its indexes, find-links and torch cap)."""
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)


def run_tool(universe: Path, out: Path, *args: str) -> dict:
    """tools/wheelhouse.py on ``universe`` alone (pip runs on this interpreter); its wheelhouse.json."""
    wheelhouse.main(["--out", str(out), "--python", sys.executable, "--pip-arg=--no-index",
                     f"--pip-arg=--find-links={universe}", *args])
    return json.loads((out / "wheelhouse.json").read_text())


@pytest.fixture(scope="module")
def wheelhouses(universe, tmp_path_factory) -> dict[str, tuple[Path, dict, str]]:
    """Python version -> (DIR, its wheelhouse.json, what the tool printed), one run each."""
    results = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PIP_CONFIG_FILE", os.devnull)
        patch.delenv("PIP_FIND_LINKS", raising=False)
        for python_version in ("3.11", "3.12"):
            out = tmp_path_factory.mktemp(f"wheels{python_version}")
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed):
                plan = run_tool(universe, out, "--python-version", python_version)
            results[python_version] = (out, plan, printed.getvalue())
    return results


@pytest.mark.parametrize("python_version", ["3.11", "3.12"])
def test_resolves_for_the_target_python(python_version, wheelhouses):
    out, plan, printed = wheelhouses[python_version]
    downloads = plan["downloads"]
    # Requires-Python of the target, not of the interpreter running pip (3.11 here).
    assert downloads["megatron-core"] == ("0.19.2" if python_version == "3.12" else "0.16.1")
    # glibc 2.28: numpy 2.1.0's manylinux_2_34 wheel does not run there; the target's CPython tag is taken.
    assert downloads["numpy"] == "2.0.0"
    assert f"numpy-2.0.0-cp{python_version.replace('.', '')}-" in " ".join(plan["sizes"])
    # The target's markers: pip on 3.11 resolves tomli and skips typing-extensions; the tool corrects both ways.
    assert ("tomli" in downloads) == (python_version == "3.11")
    assert ("typing-extensions" in downloads) == (python_version == "3.12")
    assert plan["not_for_target"] == (["tomli"] if python_version == "3.12" else [])
    assert "aiohttp" in downloads and "requests" not in downloads  # fsspec[http]: that extra only
    # Neither torch (nor what it needs), Transformer Engine nor vLLM; each named with the reason.
    assert not {"torch", "transformer-engine", "vllm", "nvidia-cublas-cu12"} & set(downloads)
    assert set(plan["left_out"]) == {"torch", "transformer-engine", "vllm"}
    assert plan["torch"] == wheelhouse.DEFAULT_TORCH
    # The files: exactly the plan's, their sizes recorded; requirements.txt pins the runtime ones.
    files = {path.name: path.stat().st_size for path in out.glob("*.whl")}
    assert files == plan["sizes"] and plan["total_bytes"] == sum(files.values())
    assert {canonicalize_name(name.split("-")[0]) for name in files} == set(downloads)
    pins = [line for line in (out / "requirements.txt").read_text().splitlines() if not line.startswith("#")]
    assert pins == [f"{name}=={downloads[name]}" for name in plan["pinned"]]
    assert "wheel" not in plan["pinned"] and "wheel" in downloads  # pip install -e's build environment only
    assert plan["provenance"]["revision"] and not plan["dry_run"]
    assert f"pip install --no-index --find-links {out} -r {out / 'requirements.txt'} -e ." in printed
    assert "left out: torch" in printed and "total in" in printed


def test_the_wheelhouse_installs_offline(wheelhouses, tmp_path, offline_pip):
    """The node's command resolves from DIR alone, given the node's torch (here a wheel standing in for it)."""
    out = wheelhouses["3.11"][0]
    node_torch = tmp_path / "node"
    node_torch.mkdir()
    make_wheel(node_torch, "torch", "2.11.0")
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(out),
                             "--find-links", str(node_torch), "-r", str(out / "requirements.txt"), "torch==2.11.0",
                             "--target", str(tmp_path / "site"), "--dry-run", "--report", str(tmp_path / "r.json")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    installed = {item["metadata"]["name"] for item in json.loads((tmp_path / "r.json").read_text())["install"]}
    assert "datasets" in installed and "megatron-core" in installed


def test_the_nodes_packages_are_skipped(universe, tmp_path, offline_pip, capsys):
    freeze = tmp_path / "node_freeze.txt"
    # numpy 2.0.0 and tqdm satisfy every requirement on them; pyarrow 12 is too old for datasets (>= 15);
    # setuptools is present but pip install -e builds in an isolated environment, which needs it in DIR.
    freeze.write_text("numpy==2.0.0\ntqdm==4.99\npyarrow==12.0\nsetuptools==80.0\ntorch==2.9.1+cu128\n"
                      "megatron-save @ file:///workspace/megatron-save\n")
    plan = run_tool(universe, tmp_path / "wheels", "--python-version", "3.12", "--exclude-present", str(freeze))
    assert plan["kept_from_node"] == {"numpy": "2.0.0", "tqdm": "4.99"}
    assert "numpy" not in plan["downloads"] and "tqdm" not in plan["downloads"]
    assert plan["downloads"]["pyarrow"] == "20.0"  # the node's is too old: upgraded from DIR
    assert "setuptools" in plan["downloads"] and "setuptools" not in plan["pinned"]
    assert plan["torch"] == "2.9.1+cu128"  # resolved against the node's torch
    assert not list((tmp_path / "wheels").glob("numpy-*"))
    assert "the node's own: numpy 2.0.0, tqdm 4.99" in capsys.readouterr().out


def test_a_node_torch_older_than_required_is_refused(universe, tmp_path, offline_pip):
    with pytest.raises(RuntimeError, match="resolving for Python 3.12 failed"):
        run_tool(universe, tmp_path / "wheels", "--python-version", "3.12", "--torch-version", "2.4.0")


def test_refuses_a_directory_with_other_wheels(tmp_path):
    scratch, out = tmp_path / "scratch", tmp_path / "wheels"
    scratch.mkdir()
    out.mkdir()
    plan = wheelhouse.Plan("3.12", "2.28", "2.11.0", files={"tqdm": str(make_wheel(scratch, "tqdm", "4.0"))})
    make_wheel(out, "tqdm", "4.0")  # a wheel of the plan already there (an earlier run): fine
    wheelhouse.fill_wheelhouse(plan, out)
    make_wheel(out, "stale", "1.0")
    with pytest.raises(ValueError, match="holds wheels this wheelhouse does not need: stale-1.0"):
        wheelhouse.fill_wheelhouse(plan, out)


def test_bad_freeze_lines_and_settings_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"node\.txt:2: 'numpy>=2' is not a name==version line"):
        wheelhouse.parse_freeze("tqdm==4.0\nnumpy>=2\n", "node.txt")
    assert wheelhouse.parse_freeze("# c\n-e /src\nTyping_Extensions==4.1\n", "f") == {"typing-extensions": "4.1"}
    with pytest.raises(ValueError, match="--glibc '2'"):
        wheelhouse.manylinux_platforms("2")
    with pytest.raises(ValueError, match="is not a PEP 440 version"):
        wheelhouse.stand_in_version("latest")
    with pytest.raises(SystemExit):
        wheelhouse.main(["--python-version", "312", "--out", str(tmp_path)])


def test_manylinux_platforms_cover_older_glibc():
    tags = wheelhouse.manylinux_platforms("2.28")
    assert tags[0] == "manylinux_2_28_x86_64" and "manylinux_2_17_x86_64" in tags and "manylinux1_x86_64" in tags
    assert "manylinux_2_29_x86_64" not in tags and "manylinux2014_x86_64" in wheelhouse.manylinux_platforms("2.17")


def test_walk_follows_target_markers_and_extras():
    metadata = {"a": ["b[x]>=1", "c; python_version < '3.12'"], "b": ["d; extra == 'x'", "e; extra == 'y'"],
                "d": [], "torch": ["nvidia-cublas"]}
    needed, missing = wheelhouse.walk_requirements(["a", "torch>=2.6"], metadata,
                                                   wheelhouse.target_environment("3.12"))
    assert set(needed) == {"a", "b", "d", "torch"} and not missing  # no c (3.11 only), no e, nothing of torch's
    needed, missing = wheelhouse.walk_requirements(["a"], metadata, wheelhouse.target_environment("3.11"))
    assert set(missing) == {"c"}


def _index_reachable() -> bool:
    try:
        socket.create_connection(("pypi.org", 443), timeout=5).close()
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _index_reachable(), reason="needs the package index (pypi.org) for a real download")
def test_a_real_small_wheelhouse_from_the_index(tmp_path, capsys):
    """The tool against the configured index: a project needing omegaconf (and through it PyYAML, a compiled
    wheel), for both Pythons; about 1 MB each."""
    setup_py = tmp_path / "setup.py"
    setup_py.write_text('from setuptools import setup\nsetup(name="small", install_requires=["omegaconf>=2.3"])\n')
    for python_version in ("3.11", "3.12"):
        out = tmp_path / python_version
        wheelhouse.main(["--python-version", python_version, "--out", str(out), "--setup-py", str(setup_py),
                         "--python", sys.executable])
        plan = json.loads((out / "wheelhouse.json").read_text())
        assert {"omegaconf", "pyyaml", "setuptools", "wheel"} <= set(plan["downloads"])
        tag = f"cp{python_version.replace('.', '')}"
        assert any(name.startswith("pyyaml-") and f"-{tag}-{tag}-manylinux" in name for name in plan["sizes"])
        assert sum(path.stat().st_size for path in out.glob("*.whl")) == plan["total_bytes"] < 20 * 2**20
    assert "pip install --no-index --find-links" in capsys.readouterr().out


def test_the_command_line_dry_run(tmp_path, universe):
    """As a user runs it, python tools/wheelhouse.py ... --dry-run: the plan with sizes, no wheel in DIR."""
    out = tmp_path / "w"
    result = subprocess.run([sys.executable, str(TOOL), "--python-version", "3.12", "--out", str(out), "--dry-run",
                             "--python", sys.executable, "--pip-arg=--no-index", f"--pip-arg=--find-links={universe}"],
                            capture_output=True, text=True,
                            env={**{k: v for k, v in os.environ.items() if k != "PIP_FIND_LINKS"},
                                 "PIP_CONFIG_FILE": os.devnull})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "dry run: not downloaded" in result.stdout and "(dry run: not written)" in result.stdout
    plan = json.loads((out / "wheelhouse.json").read_text())
    assert plan["dry_run"] and plan["total_bytes"] == sum(plan["sizes"].values()) > 0
    assert not list(out.glob("*.whl")) and (out / "requirements.txt").exists()
