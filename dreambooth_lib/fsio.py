"""Durable file writes: what a run writes is either whole on disk or not there, and readable like any file.

`publish` is the one way a checkpoint, final weights or a summary reach their final name: fsync the
temporary copy, rename it, fsync the parent folder (as databases do). A write that fails for a reason
of the disk (full, quota, I/O) is told apart from a bug (`is_write_failure`) and explained in words.
"""

from __future__ import annotations

import errno
import json
import os
import re
from pathlib import Path

from safetensors import SafetensorError


def fsync(path: Path) -> None:
    """Flush one file's (or folder's entries') bytes to the disk: os.replace alone orders nothing, so
    after a power cut a renamed folder could hold empty files. Folders cannot be opened on Windows."""
    if path.is_dir() and os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """fsync every file under `folder`, then its folders deepest first, `folder` itself last."""
    paths = sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True)
    for path in [p for p in paths if p.is_file()] + [p for p in paths if p.is_dir()] + [folder]:
        fsync(path)


def publish(tmp: Path, final: Path) -> None:
    """Durable atomic publish, as databases do: fsync what tmp holds, rename it to final (a file or a
    folder that does not exist yet), fsync the parent folder so that the rename itself is on disk."""
    follow_umask(tmp)
    if tmp.is_dir():
        fsync_tree(tmp)
    else:
        fsync(tmp)
    os.replace(tmp, final)
    fsync(final.parent)


def sort_safetensors_metadata(path: Path) -> None:
    """Rewrite a safetensors file's header with its __metadata__ keys sorted, so that the same weights give the
    same bytes: safetensors writes that map in hash order, different in every process (the tensors' entries
    are already in a fixed order). Same keys and values, so the header keeps its length and the tensor data
    is not touched; a file being written (a temporary copy before `publish`) is the one to pass."""
    with open(path, "r+b") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        if not header.get("__metadata__"):
            return
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > size:  # an escape written otherwise than safetensors did: keep its header as it is
            return
        f.seek(8)
        f.write(text + b" " * (size - len(text)))


def write_text_durably(path: Path, text: str) -> None:
    """A small file (summary, manifest) written whole or not at all."""
    tmp = path.with_name(f".tmp-{path.name}")
    try:
        tmp.write_text(text)
        publish(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)  # a full disk: the half-written copy only takes what space is left
        raise


def follow_umask(path: Path) -> None:
    """Give the file `path`, or every file under the folder `path`, the mode open() gives a new file
    (0o666 less the process umask). safetensors >= 0.8 writes each file as a temp file created 0600 and
    renames it (safetensors issue #782), so weights were readable by their owner only: on a shared
    machine nobody else could sample them, unlike every other file of the run."""
    mask = os.umask(0o022)  # reading the umask means setting it: put back at once
    os.umask(mask)
    for file in [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]:
        os.chmod(file, 0o666 & ~mask)


def is_write_failure(err: BaseException) -> bool:
    """An error of the disk rather than of the program: an OSError, or safetensors' I/O error (its own
    exception type, e.g. "I/O error: No space left on device (os error 28)")."""
    return isinstance(err, OSError) or (isinstance(err, SafetensorError) and "I/O error" in str(err))


def write_failure_reason(err: BaseException) -> str:
    """"No space left on device (ENOSPC)" and the like, from an OSError or safetensors' message."""
    code = err.errno if isinstance(err, OSError) else None
    if code is None and (found := re.search(r"os error (\d+)", str(err))):
        code = int(found.group(1))
    if code is None:
        return str(err) or type(err).__name__
    return f"{os.strerror(code)} ({errno.errorcode.get(code, code)})"
