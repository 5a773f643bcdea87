"""Atomic files and stage folders: no stage loses or half-writes data.

A stage writes into ``<dir>.tmp/`` and renames it to ``<dir>`` when complete, with a
``stage.json`` that records its config, the git SHA, its inputs and ``"status": "complete"``.
A complete stage is skipped unless ``force=True``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = [
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "file_sha256",
    "git_sha",
    "StageDir",
]


def _umask() -> int:
    """The process's file-mode creation mask (read from /proc where it can be, without changing it)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # no /proc: read it by setting it, and put it back at once
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temp file in the same folder and ``os.replace``.

    The file ends with the mode a plain ``open(path, "w")`` gives (``0o666`` less the umask, e.g.
    ``0644`` under umask 022), not the ``0600`` of :func:`tempfile.mkstemp`: results on a shared
    cluster stay readable by the group.

    Args:
        path: the file to write; its folder is made if missing.
        data: the bytes it holds afterwards.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if hasattr(os, "fchmod"):
                os.fchmod(f.fileno(), 0o666 & ~_umask())
            else:  # pragma: no cover - Windows has no fchmod
                os.chmod(tmp, 0o666 & ~_umask())
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` as UTF-8 to ``path`` atomically (see :func:`atomic_write_bytes`).

    Args:
        path: destination file; its parent folder is created.
        text: the whole content.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON with sorted keys to ``path`` atomically.

    Values JSON cannot hold (paths, numpy scalars) are written as their ``str``.

    Args:
        path: destination file; its parent folder is created.
        obj: a JSON-serialisable object.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 hex digest of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def git_sha() -> str | None:
    """The current git commit of the diffmask checkout, or None outside git."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def link_or_copy(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """``dst`` becomes a hard link to ``src`` (a copy across file systems); never half-written.

    Only for files that are replaced atomically, never modified in place: a link shares them.
    """
    src, dst = Path(src), Path(dst)
    if dst.is_file():
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
    return dst


class StageDir:
    """A stage's output folder, written under ``<path>.tmp`` and renamed when complete.

    Examples::

        stage = StageDir("artifacts/synthesis/run1")
        if stage.is_complete() and not force:
            return stage.path
        work = stage.begin(resume=True)          # artifacts/synthesis/run1.tmp
        ...write files into work...
        stage.commit(config=cfg_dict, inputs={"diffusion": "artifacts/diffusion/run1"}, counts={"n": 10})
    """

    STAGE_FILE = "stage.json"

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.tmp_path = self.path.with_name(self.path.name + ".tmp")

    def is_complete(self) -> bool:
        """Whether ``<path>/stage.json`` exists and says ``"status": "complete"``."""
        info = self.path / self.STAGE_FILE
        if not info.is_file():
            return False
        try:
            return json.loads(info.read_text()).get("status") == "complete"
        except json.JSONDecodeError:
            return False

    def info(self) -> dict[str, Any]:
        """The ``stage.json`` of a complete stage; a clear error if the stage is not complete."""
        info = self.path / self.STAGE_FILE
        if not info.is_file():
            raise FileNotFoundError(
                f"{self.path}: not a complete stage folder (no {self.STAGE_FILE}); "
                "run the stage that makes it first"
            )
        return json.loads(info.read_text())

    def changed_settings(self, config: dict[str, Any], ignore: tuple[str, ...] = ()) -> list[str]:
        """Settings of ``config`` that differ from the complete stage's recorded config.

        Keys are dotted paths (``num_samples: 32 -> 40``); keys starting with any prefix in
        ``ignore`` (run-dir paths, logging, progress bars) are left out. A key one side lacks
        and the other sets to null is no change: a setting added to the configs later, with a
        null (off) default, does not make older stage folders "other settings".
        """
        recorded = _flatten(self.info().get("config", {}))
        current = _flatten(config)
        changed = []
        for key in sorted(set(recorded) | set(current)):
            if any(key == p or key.startswith(p + ".") for p in ignore):
                continue
            if recorded.get(key) is None and current.get(key) is None:
                continue
            if recorded.get(key, "<unset>") != current.get(key, "<unset>"):
                changed.append(f"{key}: {recorded.get(key, '<unset>')!r} -> {current.get(key, '<unset>')!r}")
        return changed

    def begin(self, resume: bool = True) -> Path:
        """Create (or, with ``resume``, reuse) the work folder ``<path>.tmp`` and return it."""
        if self.tmp_path.exists() and not resume:
            shutil.rmtree(self.tmp_path)
        self.tmp_path.mkdir(parents=True, exist_ok=True)
        return self.tmp_path

    def reopen(self) -> Path:
        """A work folder holding a copy of the complete stage, to add to it (e.g. more samples).

        The complete folder stays in place and readable until :meth:`commit` replaces it; the
        copy hard-links files that writers replace atomically and copies the text files they
        append to (``*.jsonl``, ``*.json``).
        """
        if self.tmp_path.exists():
            raise FileExistsError(f"{self.tmp_path}: a work folder exists already; resume or delete it first")
        if not self.is_complete():
            raise FileNotFoundError(f"{self.path}: not a complete stage folder; nothing to reopen")
        partial = self.path.with_name(self.path.name + ".reopen")
        shutil.rmtree(partial, ignore_errors=True)
        for src in sorted(self.path.rglob("*")):
            dst = partial / src.relative_to(self.path)
            if src.is_dir():
                dst.mkdir(parents=True, exist_ok=True)
            elif src.suffix in (".jsonl", ".json"):
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, dst)
            else:
                link_or_copy(src, dst)
        os.replace(partial, self.tmp_path)
        return self.tmp_path

    def commit(
        self,
        config: dict[str, Any] | None = None,
        inputs: dict[str, str] | None = None,
        counts: dict[str, Any] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> Path:
        """Write ``stage.json`` into the work folder and atomically move it to ``path``."""
        if not self.tmp_path.is_dir():
            raise FileNotFoundError(f"{self.tmp_path}: no work folder to commit; call begin() first")
        input_hashes = {}
        for name, folder in (inputs or {}).items():
            manifest = Path(folder) / "manifest.jsonl"
            input_hashes[name] = {
                "path": str(folder),
                "manifest_sha256": file_sha256(manifest) if manifest.is_file() else None,
            }
        info = {
            "status": "complete",
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "git_sha": git_sha(),
            "config": config or {},
            "inputs": input_hashes,
            "counts": counts or {},
            **(extra or {}),
        }
        atomic_write_json(self.tmp_path / self.STAGE_FILE, info)
        if self.path.exists():
            old = self.path.with_name(self.path.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(self.path, old)
            os.replace(self.tmp_path, self.path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self.tmp_path, self.path)
        return self.path


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: obj}


def iter_jsonl(path: str | os.PathLike) -> Iterable[dict[str, Any]]:
    """Rows of a JSON-lines file; a clear error naming the file and line on bad JSON."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from e
