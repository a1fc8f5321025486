"""An offline wheelhouse for a Linux x86-64 GPU node that already has a CUDA torch but no internet.

    python tools/wheelhouse.py --python-version 3.12 --out DIR [--exclude-present NODE_FREEZE.txt] [--dry-run]

Run it on a machine with internet access. It resolves setup.py's install_requires (megatron-core, omegaconf,
datasets, transformers, ... and their dependencies) for CPython X.Y on x86-64 Linux (manylinux wheels for glibc
2.28, or --glibc), wheels only, with the build requirements of ``pip install -e`` (setuptools, wheel), and puts
the wheels in DIR. Left out, and named in the report: torch (the node's own CUDA build: a stand-in wheel without
dependencies takes its place in the resolution, so its CUDA libraries and triton are neither resolved nor
downloaded), Transformer Engine and vLLM (built against the node's CUDA stack: install them with it). With
``--exclude-present FILE`` (``pip list --format=freeze`` run on the node) a package the node already has at a
version that satisfies every requirement on it is skipped, and the node's torch version is the one resolved
against. Then it prints the node's install command, run in the megatron-save checkout copied to the node::

    pip install --no-index --find-links DIR -r DIR/requirements.txt -e .

DIR/requirements.txt pins what the node installs; DIR/wheelhouse.json records the resolution, what was skipped
and left out, each wheel's size and the provenance stamp. ``--dry-run`` resolves (pip downloads into a scratch
directory, so the sizes are known) and writes both files, without putting wheels in DIR.

pip evaluates environment markers (``; python_version < "3.12"``) for the interpreter it runs on, not for
``--python-version`` (pypa/pip#11010): the tool runs pip on ``python{X.Y}`` when PATH has a working one (or
``--python``), and in every case walks the requirements again with the target's markers, leaves out what only the
running interpreter needed and resolves again with what the target needs that pip left out.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import asdict, dataclass, field
from email.parser import HeaderParser
from pathlib import Path

try:
    from packaging.markers import default_environment
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet
    from packaging.utils import canonicalize_name
    from packaging.version import InvalidVersion, Version
except ImportError:  # an interpreter without packaging: pip's copy
    from pip._vendor.packaging.markers import default_environment
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.specifiers import SpecifierSet
    from pip._vendor.packaging.utils import canonicalize_name
    from pip._vendor.packaging.version import InvalidVersion, Version

REPO = Path(__file__).resolve().parent.parent
PROVIDED = "torch"
"""The node's own package: resolved against a stand-in, never downloaded."""
LEFT_OUT = ("torch", "transformer-engine", "vllm")
"""Never downloaded (the node's CUDA stack provides them); named in the report."""
BUILD_REQUIREMENTS = ("setuptools>=40.8.0", "wheel")
"""What ``pip install -e`` of a setup.py project installs into its isolated build environment (from DIR on the
node, so always downloaded, whatever the node has)."""
DEFAULT_TORCH = "2.11.0"
"""The torch version resolved against without --exclude-present (the lent H100 node's; any >= setup.py's works)."""
DEFAULT_GLIBC = "2.28"
"""The node's glibc at least (RHEL 8, Ubuntu 20.04 and later, every CUDA 12 container)."""
LEGACY_MANYLINUX = {"manylinux2014": 17, "manylinux2010": 12, "manylinux1": 5}
"""The old manylinux tags and the glibc 2.x they stand for (PEP 600)."""
STAND_IN_LABEL = "wheelhouse.node"
"""Local version label of the stand-in wheels: no index has such a version, so pip picks the stand-in."""
RESOLUTION_ROUNDS = 3
"""Resolutions at most: the first, and again with what the target's markers add (once is the usual case)."""


@dataclass
class Plan:
    """What the wheelhouse holds and why."""

    python_version: str
    """The target's Python, X.Y."""
    glibc: str
    """The node's glibc, X.Y: wheels tagged for it or older are accepted."""
    torch: str
    """The node's torch version, resolved against."""
    pip_python: str = ""
    """The interpreter that ran pip, and its version (markers are its own unless it is the target's)."""
    downloads: dict[str, str] = field(default_factory=dict)
    """Canonical name -> version of every wheel to download (runtime and build requirements)."""
    pinned: list[str] = field(default_factory=list)
    """Names of ``downloads`` the node installs (pinned in requirements.txt); the others are only for the build
    environment of ``pip install -e``."""
    kept_from_node: dict[str, str] = field(default_factory=dict)
    """Name -> the node's version, for packages it has at a version every requirement on them accepts."""
    left_out: dict[str, str] = field(default_factory=dict)
    """Name -> why it is not in the wheelhouse."""
    not_for_target: list[str] = field(default_factory=list)
    """Resolved only because pip evaluated markers for its own interpreter: not downloaded."""
    sizes: dict[str, int] = field(default_factory=dict)
    """Wheel file name -> bytes of each download."""
    files: dict[str, str] = field(default_factory=dict)
    """Name -> the downloaded wheel's path (in the resolution's scratch directory)."""


def install_requires(setup_py: Path) -> list[str]:
    """The ``install_requires`` list literal of the ``setup(...)`` call in ``setup_py``."""
    for node in ast.walk(ast.parse(setup_py.read_text(), str(setup_py))):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setup":
            for keyword in node.keywords:
                if keyword.arg == "install_requires":
                    try:
                        return list(ast.literal_eval(keyword.value))
                    except ValueError as error:
                        raise ValueError(f"{setup_py}: install_requires is not a list literal ({error})") from error
    raise ValueError(f"{setup_py}: no setup(install_requires=[...]) list literal")


def parse_freeze(text: str, source: str) -> dict[str, str]:
    """Canonical name -> version of a ``pip list --format=freeze`` (or ``pip freeze``) listing; refuses a line
    that is neither ``name==version``, a comment nor an editable / direct-URL install, naming ``source``:line."""
    present = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#") or line.startswith("-e ") or " @ " in line:
            continue  # an editable or URL install is the node's own code, not a wheel we could skip
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)", line)
        if not match:
            raise ValueError(f"{source}:{number}: {line!r} is not a name==version line of pip list --format=freeze")
        present[canonicalize_name(match.group(1))] = match.group(2)
    return present


def stand_in_wheel(directory: Path, name: str, version: str) -> Path:
    """A wheel of ``name`` at ``version`` with no files and no dependencies, for pip to resolve against."""
    dist_info = f"{name.replace('-', '_')}-{version}.dist-info"
    path = directory / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
    files = {f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{dist_info}/WHEEL": "Wheel-Version: 1.0\nGenerator: megatron-save wheelhouse\nRoot-Is-Purelib: true\n"
                                   "Tag: py3-none-any\n"}
    files[f"{dist_info}/RECORD"] = "".join(f"{member},,\n" for member in [*files, f"{dist_info}/RECORD"])
    with zipfile.ZipFile(path, "w") as wheel:
        for member, text in files.items():
            wheel.writestr(member, text)
    return path


def stand_in_version(torch_version: str) -> str:
    """The node's torch version with the stand-in's local label (PEP 440: ``>=``, ``==X.Y.Z`` still match)."""
    public = torch_version.split("+", 1)[0]
    try:
        Version(public)
    except InvalidVersion as error:
        raise ValueError(f"torch version {torch_version!r} is not a PEP 440 version") from error
    return f"{public}+{STAND_IN_LABEL}"


def target_environment(python_version: str, python_full_version: str | None = None) -> dict[str, str]:
    """PEP 508 marker variables of CPython ``python_version`` on Linux x86-64."""
    environment = default_environment()
    environment.update({
        "python_version": python_version, "python_full_version": python_full_version or f"{python_version}.0",
        "implementation_name": "cpython", "implementation_version": python_full_version or f"{python_version}.0",
        "platform_python_implementation": "CPython", "sys_platform": "linux", "platform_system": "Linux",
        "os_name": "posix", "platform_machine": "x86_64",
    })
    return environment


def _applies(requirement: Requirement, environment: dict[str, str], extras: set[str]) -> bool:
    if requirement.marker is None:
        return True
    return any(requirement.marker.evaluate({**environment, "extra": extra}) for extra in extras | {""})


def walk_requirements(roots: list[str], metadata: dict[str, list[str]], environment: dict[str, str]
                      ) -> tuple[dict[str, list[SpecifierSet]], dict[str, Requirement]]:
    """Everything ``roots`` need on the target: name -> the specifiers put on it along the way, following each
    resolved package's Requires-Dist (``metadata``: name -> requirement strings) with the extras asked of it,
    markers evaluated in ``environment``. Also name -> a requirement on each needed name that ``metadata`` lacks.
    LEFT_OUT packages are recorded, not followed."""
    specifiers: dict[str, list[SpecifierSet]] = {}
    extras: dict[str, set[str]] = {}
    missing: dict[str, Requirement] = {}
    pending = [Requirement(r) for r in roots]
    while pending:
        requirement = pending.pop()
        name = canonicalize_name(requirement.name)
        new_extras = set(requirement.extras) - extras.get(name, set())
        first = name not in specifiers
        specifiers.setdefault(name, []).append(requirement.specifier)
        extras.setdefault(name, set()).update(requirement.extras)
        if name in LEFT_OUT or not (first or new_extras):
            continue  # the node's torch (a stand-in) and its CUDA stack's packages are not followed
        if name not in metadata:
            missing[name] = requirement
            continue
        for text in metadata[name]:
            dependency = Requirement(text)
            if _applies(dependency, environment, extras[name]):
                pending.append(dependency)
    return specifiers, missing


def node_keeps(version: str | None, specifiers: list[SpecifierSet]) -> bool:
    """Whether the node's installed ``version`` satisfies every specifier put on its package."""
    if version is None:
        return False
    try:
        parsed = Version(version)
    except InvalidVersion:
        return False
    return all(specifier.contains(parsed, prereleases=True) for specifier in specifiers)


@dataclass(frozen=True)
class Wheel:
    """One wheel pip resolved."""

    path: Path
    version: str
    requires_dist: tuple[str, ...]


def read_wheel(path: Path) -> tuple[str, Wheel]:
    """Canonical name and the facts of a downloaded wheel, from its METADATA."""
    with zipfile.ZipFile(path) as archive:
        member = next((m for m in archive.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", m)), None)
        if member is None:
            raise ValueError(f"{path}: a wheel without a .dist-info/METADATA")
        metadata = HeaderParser().parsestr(archive.read(member).decode("utf-8"))
    return canonicalize_name(metadata["Name"]), Wheel(path, metadata["Version"],
                                                      tuple(metadata.get_all("Requires-Dist") or ()))


def make_plan(resolved: dict[str, Wheel], roots: list[str], environment: dict[str, str], present: dict[str, str],
              plan: Plan) -> dict[str, Requirement]:
    """Fills ``plan`` from what pip resolved; returns the requirements the target needs that pip left out (it
    evaluated a marker for its own interpreter)."""
    metadata = {name: list(wheel.requires_dist) for name, wheel in resolved.items()}
    needed, missing = walk_requirements(roots + list(BUILD_REQUIREMENTS), metadata, environment)
    build, _ = walk_requirements(list(BUILD_REQUIREMENTS), metadata, environment)
    runtime, _ = walk_requirements(roots, metadata, environment)
    plan.downloads, plan.pinned, plan.kept_from_node, plan.not_for_target, plan.sizes = {}, [], {}, [], {}
    plan.left_out = {PROVIDED: f"the node's own CUDA build; resolved against torch {plan.torch}",
                     "transformer-engine": "built against the node's CUDA stack: install it there",
                     "vllm": "built against the node's CUDA torch: install it there"}
    for name, wheel in sorted(resolved.items()):
        if name in LEFT_OUT:
            continue
        if name not in needed:
            plan.not_for_target.append(name)
            continue
        if name in runtime:
            if node_keeps(present.get(name), needed[name]):
                plan.kept_from_node[name] = present[name]
            else:
                plan.pinned.append(name)
        if name in build or name in plan.pinned:
            plan.downloads[name] = wheel.version
            plan.sizes[wheel.path.name] = wheel.path.stat().st_size
    return missing


def manylinux_platforms(glibc: str) -> list[str]:
    """Every x86-64 manylinux tag a node with ``glibc`` (2.Y) runs, newest first: pip takes --platform literally
    and does not add the older glibc versions itself."""
    match = re.fullmatch(r"2\.(\d+)", glibc)
    if not match or int(match.group(1)) < 5:
        raise ValueError(f"--glibc {glibc!r}: expected 2.Y with Y >= 5, e.g. 2.28")
    newest = int(match.group(1))
    tags = [f"manylinux_2_{minor}_x86_64" for minor in range(newest, 4, -1)]
    return tags + [f"{tag}_x86_64" for tag, minor in LEGACY_MANYLINUX.items() if minor <= newest]


def _pip_target_options(python_version: str, glibc: str) -> list[str]:
    platforms = [option for tag in manylinux_platforms(glibc) for option in ("--platform", tag)]
    return ["--only-binary=:all:", *platforms, "--python-version", python_version, "--implementation", "cp"]


def _run_pip(python: str, arguments: list[str], what: str, pip_args: list[str]) -> None:
    command = [python, "-m", "pip", "--disable-pip-version-check", *arguments, *pip_args]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{what} failed ({shlex.join(command)}):\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")


def resolve(python: str, requirements: list[str], python_version: str, glibc: str, torch_version: str,
            work: Path, pip_args: list[str]) -> dict[str, Wheel]:
    """``pip download`` of ``requirements`` and their dependencies for the target into ``work``/wheels, torch
    pinned to a stand-in wheel of ``torch_version``; name -> wheel of everything it resolved. (pip download, not
    ``pip install --dry-run --report``: install checks Requires-Python against the interpreter running it, not
    --python-version, and backtracks to old releases when they differ; and an index without PEP 658 metadata
    makes a dry run download every wheel all the same.)"""
    stand_ins, wheels = work / "stand_ins", work / "wheels"
    shutil.rmtree(wheels, ignore_errors=True)
    stand_ins.mkdir(exist_ok=True)
    version = stand_in_version(torch_version)
    stand_in_wheel(stand_ins, PROVIDED, version)
    constraints = work / "constraints.txt"
    constraints.write_text(f"{PROVIDED}=={version}\n")
    _run_pip(python, ["download", "--dest", str(wheels), "--find-links", str(stand_ins), "-c", str(constraints),
                      *_pip_target_options(python_version, glibc), *requirements],
             f"resolving for Python {python_version}", pip_args)
    return dict(read_wheel(path) for path in sorted(wheels.glob("*.whl")))


def pip_python(python_version: str, explicit: str | None) -> str:
    """The interpreter that runs pip: ``explicit``, else ``python{X.Y}`` on PATH when it reports that version
    (markers then evaluate natively), else this one."""
    if explicit:
        return explicit
    candidate = shutil.which(f"python{python_version}")
    if candidate:
        result = subprocess.run([candidate, "-c", "import sys, pip; print('%d.%d' % sys.version_info[:2])"],
                                capture_output=True, text=True)
        if result.returncode == 0 and result.stdout.strip() == python_version:
            return candidate
    return sys.executable


def interpreter_full_version(python: str, python_version: str) -> str | None:
    """``python``'s X.Y.Z when it is the target's X.Y (its markers' python_full_version), else None."""
    result = subprocess.run([python, "-c", "import platform; print(platform.python_version())"],
                            capture_output=True, text=True)
    version = result.stdout.strip()
    return version if result.returncode == 0 and version.rsplit(".", 1)[0] == python_version else None


def build_plan(requirements: list[str], python_version: str, glibc: str, present: dict[str, str],
               torch_version: str, python: str, work: Path, pip_args: list[str] = ()) -> Plan:
    """Resolves (downloading into ``work``) until every package the target's markers ask for is resolved, and
    plans the wheelhouse."""
    full_version = interpreter_full_version(python, python_version)
    plan = Plan(python_version, glibc, torch_version, f"{python} ({full_version or 'not ' + python_version})")
    environment = target_environment(python_version, full_version)
    extra: list[str] = []
    for _ in range(RESOLUTION_ROUNDS):
        resolved = resolve(python, [*requirements, *BUILD_REQUIREMENTS, *extra], python_version, glibc, torch_version,
                           work, list(pip_args))
        missing = make_plan(resolved, requirements, environment, present, plan)
        if not missing:
            plan.files = {name: str(resolved[name].path) for name in plan.downloads}
            return plan
        extra += [f"{canonicalize_name(r.name)}{'[' + ','.join(sorted(r.extras)) + ']' if r.extras else ''}"
                  f"{r.specifier}" for r in missing.values()]
    raise RuntimeError(f"Python {python_version} needs {', '.join(sorted(missing))}, which pip did not resolve "
                       f"after {RESOLUTION_ROUNDS} rounds; run pip on a Python {python_version} (--python)")


def fill_wheelhouse(plan: Plan, out: Path) -> None:
    """Copies the plan's wheels into ``out``; refuses one there that is not the plan's (pip on the node would
    consider it)."""
    out.mkdir(parents=True, exist_ok=True)
    wanted = {Path(path).name for path in plan.files.values()}
    stray = sorted(path.name for path in out.glob("*.whl") if path.name not in wanted)
    if stray:
        raise ValueError(f"{out} holds wheels this wheelhouse does not need: {', '.join(stray)}; remove them or "
                         "choose an empty --out (pip on the node would consider them)")
    for path in plan.files.values():
        shutil.copy2(path, out / Path(path).name)


def install_command(out: Path) -> str:
    """The node's command, from the megatron-save checkout copied there."""
    return (f"pip install --no-index --find-links {shlex.quote(str(out))} "
            f"-r {shlex.quote(str(out / 'requirements.txt'))} -e .")


def write_wheelhouse(plan: Plan, out: Path, dry_run: bool) -> None:
    """DIR/requirements.txt (runtime pins) and DIR/wheelhouse.json (the plan, sizes, command, provenance)."""
    sys.path.insert(0, str(REPO))
    from megatron_save.utils.provenance import current_provenance

    out.mkdir(parents=True, exist_ok=True)
    pins = [f"{name}=={plan.downloads[name]}" for name in plan.pinned]
    (out / "requirements.txt").write_text(
        f"# tools/wheelhouse.py for CPython {plan.python_version} on x86-64 Linux with glibc >= {plan.glibc}, torch "
        f"{plan.torch} on the node\n" + "".join(f"{pin}\n" for pin in pins))
    record = {**{k: v for k, v in asdict(plan).items() if k != "files"}, "dry_run": dry_run,
              "total_bytes": sum(plan.sizes.values()),
              "install_command": install_command(out), "provenance": current_provenance().as_dict()}
    (out / "wheelhouse.json").write_text(json.dumps(record, indent=1) + "\n")


def summary(plan: Plan, out: Path, dry_run: bool) -> str:
    """What a person reads: counts, what was left out and skipped, sizes, the node's command."""
    lines = [f"Python {plan.python_version}, x86-64 Linux with glibc >= {plan.glibc}, torch {plan.torch} on the node: "
             f"{len(plan.downloads)} wheels{' (dry run: not downloaded)' if dry_run else ''}"]
    lines += [f"  left out: {name} ({why})" for name, why in plan.left_out.items()]
    if plan.kept_from_node:
        lines.append("  the node's own: " + ", ".join(f"{n} {v}" for n, v in sorted(plan.kept_from_node.items())))
    if plan.not_for_target:
        lines.append(f"  not needed on Python {plan.python_version}: " + ", ".join(plan.not_for_target))
    build_only = sorted(set(plan.downloads) - set(plan.pinned))
    if build_only:
        lines.append("  for the build environment of pip install -e only: " + ", ".join(build_only))
    if plan.sizes:
        lines += [f"  {size / 2**20:9.2f} MiB  {name}" for name, size in sorted(plan.sizes.items(),
                                                                               key=lambda item: -item[1])]
        where = " (dry run: not written)" if dry_run else f" in {out}"
        lines.append(f"  {sum(plan.sizes.values()) / 2**20:9.2f} MiB  total{where}")
    lines.append(f"On the node, in the megatron-save checkout:\n  {install_command(out)}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The command line of this tool (the docs test checks the documented commands against it)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--python-version", required=True, help="the node's Python, X.Y (e.g. 3.12)")
    parser.add_argument("--out", required=True, type=Path, help="the wheelhouse directory")
    parser.add_argument("--exclude-present", type=Path,
                        help="pip list --format=freeze of the node: skip what it has (and resolve against its torch)")
    parser.add_argument("--torch-version", default=None,
                        help=f"the node's torch (default: from --exclude-present, else {DEFAULT_TORCH})")
    parser.add_argument("--glibc", default=DEFAULT_GLIBC, help=f"the node's glibc (default {DEFAULT_GLIBC}; "
                                                               "ldd --version prints it)")
    parser.add_argument("--python", default=None, help="the interpreter that runs pip (default: pythonX.Y on PATH, "
                                                       "else this one)")
    parser.add_argument("--dry-run", action="store_true", help="resolve and write the plan; DIR gets no wheels")
    parser.add_argument("--setup-py", type=Path, default=REPO / "setup.py",
                        help="the project whose install_requires the node needs (default: this checkout's)")
    parser.add_argument("--pip-arg", action="append", default=[],
                        help="an option for every pip call, e.g. --pip-arg=--index-url=URL (repeatable)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not re.fullmatch(r"3\.\d+", args.python_version):
        parser.error(f"--python-version {args.python_version!r}: expected X.Y, e.g. 3.12")
    present = {}
    if args.exclude_present is not None:
        present = parse_freeze(args.exclude_present.read_text(), str(args.exclude_present))
    torch_version = args.torch_version or present.get(PROVIDED) or DEFAULT_TORCH
    # setup.py's torch requirement stays: pip checks the node's version (the stand-in) against it.
    requirements = [r for r in install_requires(args.setup_py)
                    if canonicalize_name(Requirement(r).name) not in LEFT_OUT or Requirement(r).name == PROVIDED]
    python = pip_python(args.python_version, args.python)
    with tempfile.TemporaryDirectory(prefix="wheelhouse-") as work:
        plan = build_plan(requirements, args.python_version, args.glibc, present, torch_version, python, Path(work),
                          args.pip_arg)
        if not args.dry_run:
            fill_wheelhouse(plan, args.out)
    write_wheelhouse(plan, args.out, args.dry_run)
    print(summary(plan, args.out, args.dry_run))
    return 0


if __name__ == "__main__":
    sys.exit(main())
