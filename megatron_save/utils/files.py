"""Crash-consistent file writes: atomic replacement of a small file, fsync of a finished directory tree, and the
lock that keeps a second launch out of a run directory."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
from pathlib import Path

from megatron_save.utils.logging import get_logger

logger = get_logger("utils.files")
LOCK_FILE = ".megatron_save.lock"


def fsync_directory(path: Path) -> None:
    """Makes the directory's entries (new names, renames) durable."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fsync_tree(root: Path) -> None:
    """fsync of every file under ``root``, then of every directory, deepest first (data before names)."""
    directories = [root]
    for path in sorted(root.rglob("*")):
        if path.is_dir():
            directories.append(path)
        elif path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    for directory in sorted(directories, key=lambda p: len(p.parts), reverse=True):
        fsync_directory(directory)


def publish_directory(staging: Path, final: Path) -> None:
    """Replaces ``final`` with the finished ``staging`` directory so that a crash leaves one of them whole: every
    file and name under ``staging`` synced, then the rename, then the parent directory synced."""
    fsync_tree(staging)
    shutil.rmtree(final, ignore_errors=True)
    staging.rename(final)
    fsync_directory(final.parent)


def atomic_write_text(path: Path, text: str) -> None:
    """Writes ``text`` to ``path`` so that a crash leaves either the old or the new content: a synced temporary
    file renamed over it, then the directory synced."""
    path = Path(path)
    staging = path.with_name(f".{path.name}.tmp")
    with open(staging, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(staging, path)
    fsync_directory(path.parent)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """A lock file in a run directory, held for the launch's lifetime by its first rank: a second launch into the
    same directory is refused at once, naming the holder; a lock left by a dead process of this host is taken
    over (with a warning). Ranks other than the first never touch it."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK_FILE
        self.held = False

    def __enter__(self) -> "RunLock":
        if int(os.environ.get("RANK", "0")) != 0:
            return self
        if self.path.parent.exists() and not self.path.parent.is_dir():
            raise NotADirectoryError(f"output_dir {self.path.parent} is a file, not a directory")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        holder = {"host": socket.gethostname(), "pid": os.getpid()}
        for _ in range(2):
            try:
                descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale(holder["host"])
                continue
            with os.fdopen(descriptor, "w") as handle:
                handle.write(json.dumps(holder) + "\n")
            self.held = True
            return self
        raise RuntimeError(f"{self.path}: could not take the run lock")

    def _take_over_if_stale(self, host: str) -> None:
        try:
            owner = json.loads(self.path.read_text())
        except (OSError, ValueError):
            owner = {}
        if owner.get("host") == host and isinstance(owner.get("pid"), int) and not _alive(owner["pid"]):
            logger.warning("%s: taking over the lock of process %d, which is no longer running", self.path,
                           owner["pid"])
            self.path.unlink(missing_ok=True)
            return
        raise RuntimeError(f"{self.path.parent} is in use by another launch (lock {self.path}: host "
                           f"{owner.get('host', '?')}, pid {owner.get('pid', '?')}); wait for it to end, or remove "
                           "the lock file if that launch is gone")

    def __exit__(self, *exc) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


MANIFEST_FILE = "manifest.json"


class CorruptCheckpointError(ValueError):
    """A checkpoint whose files do not match its manifest."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


MANIFEST_VERSION = 2
"""Version 2 lists every file in its scope, hidden ones (torch_dist's ``.metadata``) included; version 1 (no
``version`` field) left out names starting with a dot."""


def _files_in_scope(root: Path, parts: tuple[str, ...] | None) -> list[Path]:
    """Every file under ``root``, or under its entries ``parts`` (files or directories), except the manifest and
    the temporary file its atomic write leaves if interrupted."""
    tops = [root] if parts is None else [root / part for part in parts]
    found = []
    for top in tops:
        candidates = [top] if top.is_file() else top.rglob("*")
        found += [p for p in candidates if p.is_file() and p.relative_to(root).as_posix()
                  not in (MANIFEST_FILE, f".{MANIFEST_FILE}.tmp")]
    return sorted(found)


def write_manifest(root: Path, parts: tuple[str, ...] | None = None) -> None:
    """``root/manifest.json``: the size and SHA-256 of every file under ``root`` (or under its entries ``parts``,
    when the directory also holds other things than the checkpoint), written last, atomically."""
    root = Path(root)
    entries = {p.relative_to(root).as_posix(): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
               for p in _files_in_scope(root, parts)}
    manifest = {"version": MANIFEST_VERSION, "parts": list(parts) if parts is not None else None, "files": entries}
    atomic_write_text(root / MANIFEST_FILE, json.dumps(manifest, indent=1) + "\n")


def missing_manifest(root: Path, predates_manifests: bool, record: str) -> bool:
    """Whether ``root`` has no manifest, for a checkpoint whose format ``record`` (a file and what it says) tells
    whether it ``predates_manifests``. True (load it unverified) only for such an old checkpoint; a newer one
    without its manifest may have been altered, so CorruptCheckpointError names the missing file."""
    manifest = Path(root) / MANIFEST_FILE
    if manifest.exists():
        return False
    if not predates_manifests:
        raise CorruptCheckpointError(f"{manifest}: missing, though {record} (only a format older than manifests "
                                     "loads without one); the checkpoint cannot be verified (restore the file, or "
                                     "re-create the checkpoint)")
    return True


def tree_fingerprint(root: Path, parts: tuple[str, ...] | None = None) -> tuple:
    """(name, bytes, mtime) of the manifest and of every file in scope (``parts`` of ``root``, everything when
    None): what a cache of verified checkpoints is keyed on, so a file changed, added or removed after a
    verification is verified again (its content is not read: size and mtime stand for it)."""
    root = Path(root)
    found = _files_in_scope(root, parts) + ([root / MANIFEST_FILE] if (root / MANIFEST_FILE).exists() else [])
    return tuple((p.relative_to(root).as_posix(), p.stat().st_size, p.stat().st_mtime_ns) for p in found)


def verify_manifest(root: Path, hashes: bool = True, parts: tuple[str, ...] | None = None) -> bool:
    """Checks the files under ``root`` against its manifest: every listed file present with its size, and
    (``hashes``) its SHA-256, and no file in the manifest's scope (``parts`` of ``root``, as the manifest records
    them or else as given; everything when None) that it does not list: a file added after writing (a planted
    pickle) is refused like a changed one. Raises CorruptCheckpointError naming the first bad file. Returns False
    when there is no manifest (a checkpoint written before manifests existed)."""
    root = Path(root)
    manifest = root / MANIFEST_FILE
    if not manifest.exists():
        return False
    try:
        written = json.loads(manifest.read_text())
        entries = written["files"]
    except (ValueError, KeyError, TypeError) as error:
        raise CorruptCheckpointError(f"{manifest}: unreadable manifest ({error})") from error
    for name, entry in entries.items():
        path = root / name
        if not path.is_file():
            raise CorruptCheckpointError(f"{path}: listed in {manifest} but missing")
        if path.stat().st_size != entry["bytes"]:
            raise CorruptCheckpointError(f"{path}: {path.stat().st_size} bytes, {manifest} says {entry['bytes']}")
    lists_hidden = written.get("version", 1) >= 2
    scope = tuple(written["parts"]) if written.get("parts") is not None else parts
    for path in _files_in_scope(root, scope):
        name = path.relative_to(root).as_posix()
        hidden = any(part.startswith(".") for part in Path(name).parts)
        if name not in entries and (lists_hidden or not hidden):
            raise CorruptCheckpointError(f"{path}: not listed in {manifest} (a file added after the checkpoint was "
                                         "written); remove it if you know where it came from")
    if hashes:
        for name, entry in entries.items():
            if _sha256(root / name) != entry["sha256"]:
                raise CorruptCheckpointError(f"{root / name}: SHA-256 differs from {manifest} (the file is "
                                             "damaged or was changed)")
    return True
