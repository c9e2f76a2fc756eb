"""Adapter files in and out: uploaded files and archives unpacked safely within a size limit, and a stored
version or checkpoint exported as a .tar.gz.

Unpacking refuses what could land outside its folder or stand for something else (absolute paths, '..', links,
devices), more than MAX_ARCHIVE_MEMBERS entries, and more than the limit of bytes unpacked, counted as written. What
it unpacks is then checked as a PEFT adapter (functions/adapter_check.py) before it is published
(functions/repos.py).
"""

import gzip
import io
import json
import re
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from typing import IO

from app.errors import TooLarge
from functions.adapter_check import CONFIG_FILE, HEAD_FILES, WEIGHTS_FILE, AdapterRejected
from functions.catalog import get_model

STORED_FILES = (CONFIG_FILE, WEIGHTS_FILE)  # what an import keeps; an export adds a head's HEAD_FILES
MAX_ARCHIVE_MEMBERS = 1000  # a PEFT directory has a handful of files; thousands of entries is an attack


class UploadTooLarge(TooLarge):
    """An upload that unpacks to more than LORAPLEX_MAX_UPLOAD_BYTES; `field` names the form field."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message, field=field, code="file_too_large")


# ---- receiving uploads ---------------------------------------------------------------------------------


def save_files(uploads: Iterable[tuple[str, IO[bytes]]], dest: Path, limit: int) -> Path:
    """Write uploaded files (name, stream) into `dest`, by their base names, at most `limit` bytes in all."""
    dest.mkdir(parents=True, exist_ok=True)
    total = 0
    for filename, stream in uploads:
        name = PurePosixPath(filename.replace("\\", "/")).name  # a browser may send 'folder/file'
        if not name or name in (".", ".."):
            raise AdapterRejected(f"files: a file without a usable name ({filename!r})", "files")
        target = dest / name
        if target.exists():
            raise AdapterRejected(f"files: {name!r} sent twice", "files")
        total = _copy_limited(stream, target, total, limit, "files")
    return dest


def unpack_archive(stream: IO[bytes], dest: Path, limit: int) -> Path:
    """Unpack a .zip or .tar.gz into `dest` and return the adapter directory inside it (the archive's root, or
    its single top-level folder). Refuses links, absolute paths, '..', and more than `limit` bytes unpacked."""
    dest.mkdir(parents=True, exist_ok=True)
    head = stream.read(4)
    stream.seek(0)
    if head.startswith(b"PK"):
        _unpack_zip(stream, dest, limit)
    elif head.startswith(b"\x1f\x8b"):
        _unpack_tar(stream, dest, limit)
    else:
        raise AdapterRejected("archive: not a .zip or .tar.gz file", "archive")
    return _adapter_root(dest)


def _member_path(dest: Path, name: str) -> Path:
    """Where an archive member goes, refusing any name that would land outside `dest`."""
    clean = name.replace("\\", "/")
    parts = PurePosixPath(clean).parts
    if clean.startswith("/") or re.match(r"^[a-zA-Z]:", clean) or ".." in parts:
        raise AdapterRejected(f"archive: member {name!r} points outside the archive", "archive")
    parts = tuple(p for p in parts if p != ".")
    return dest.joinpath(*parts)  # `dest` itself for './', which `tar -C dir .` writes first


def _unpack_tar(stream: IO[bytes], dest: Path, limit: int) -> None:
    total = 0
    try:
        # "r|gz" reads the stream once, front to back: a member is checked before its data is read.
        with tarfile.open(fileobj=stream, mode="r|gz") as archive:
            for count, member in enumerate(archive, start=1):
                if count > MAX_ARCHIVE_MEMBERS:
                    raise AdapterRejected(f"archive: more than {MAX_ARCHIVE_MEMBERS} entries", "archive")
                target = _member_path(dest, member.name)
                if member.isdir():
                    _make_dir(target)
                    continue
                if not member.isfile():  # symlinks, hard links, devices, fifos
                    raise AdapterRejected(
                        f"archive: member {member.name!r} is a link or special file; only plain files are accepted",
                        "archive",
                    )
                if total + member.size > limit:
                    raise _too_large("archive", limit)
                source = archive.extractfile(member)
                if source is None:  # unreachable for a regular file; kept for the type checker
                    raise AdapterRejected(f"archive: member {member.name!r} cannot be read", "archive")
                total = _write_member(source, target, total, limit)
    except (tarfile.TarError, gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise AdapterRejected(f"archive: not a readable .tar.gz ({exc})", "archive") from None


def _unpack_zip(stream: IO[bytes], dest: Path, limit: int) -> None:
    try:
        with zipfile.ZipFile(stream) as archive:
            members = archive.infolist()
            if len(members) > MAX_ARCHIVE_MEMBERS:
                raise AdapterRejected(f"archive: more than {MAX_ARCHIVE_MEMBERS} entries", "archive")
            targets = []
            for info in members:  # every name and type is checked before anything is written
                target = _member_path(dest, info.filename)
                # Unix archivers keep the file type in the high bits; others (and writestr) leave it unset.
                kind = stat.S_IFMT(info.external_attr >> 16)
                if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
                    raise AdapterRejected(
                        f"archive: member {info.filename!r} is a link or special file; only plain files are accepted",
                        "archive",
                    )
                targets.append((info, target))
            # The declared sizes are checked up front, and the bytes really written are counted as well, so a
            # member that lies about its size cannot get past the limit either.
            if sum(info.file_size for info in members) > limit:
                raise _too_large("archive", limit)
            total = 0
            for info, target in targets:
                if info.is_dir():
                    _make_dir(target)
                    continue
                with archive.open(info) as source:
                    total = _write_member(source, target, total, limit)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, RuntimeError, EOFError, zlib.error) as exc:
        # RuntimeError: an encrypted member; NotImplementedError: an unknown compression method.
        raise AdapterRejected(f"archive: not a readable .zip ({exc})", "archive") from None


def _make_dir(target: Path) -> None:
    try:
        target.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise AdapterRejected(f"archive: folder {target.name!r} clashes with a file", "archive") from None


def _write_member(source: IO[bytes], target: Path, total: int, limit: int) -> int:
    """Unpack one file; names that collide (twice the same file, a file where a folder is) are refused."""
    try:
        if target.exists():
            raise FileExistsError(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        return _copy_limited(source, target, total, limit, "archive")
    except (FileExistsError, NotADirectoryError, IsADirectoryError):
        raise AdapterRejected(f"archive: {target.name!r} appears twice or clashes with a folder", "archive") from None


def _copy_limited(source: IO[bytes], target: Path, total: int, limit: int, field: str) -> int:
    with target.open("wb") as out:
        while chunk := source.read(1024 * 1024):
            total += len(chunk)
            if total > limit:
                raise _too_large(field, limit)
            out.write(chunk)
    return total


def _too_large(field: str, limit: int) -> UploadTooLarge:
    return UploadTooLarge(f"{field}: more than {limit} bytes unpacked (LORAPLEX_MAX_UPLOAD_BYTES)", field)


def _adapter_root(dest: Path) -> Path:
    """The archive's root, or its one top-level folder when that is all it holds (`tar czf a.tgz my-adapter/`).
    Folders and files that archivers add on their own (__MACOSX, .DS_Store) do not count."""
    entries = [p for p in dest.iterdir() if p.name != "__MACOSX" and not p.name.startswith(".")]
    if len(entries) == 1 and entries[0].is_dir():
        return entries[0]
    return dest


# ---- exporting -----------------------------------------------------------------------------------------


def export_archive(src: Path, dest: IO[bytes], folder: str, base_model: str, mtime: float) -> None:
    """Write the stored adapter as a .tar.gz of `folder/` holding adapter_config.json and
    adapter_model.safetensors, and a classification head's two files where it has one (functions/classifier_head.py
    says their layout). The weights are the stored bytes; in the config, base_model_name_or_path (which PEFT fills
    with the path the base model was loaded from: a server path) becomes the base model's hub id, or its catalog
    name for a local model. Other stored files (PEFT's README.md names that path too) stay out."""
    try:
        model = get_model(base_model)
        base_ref = model.hf_id or model.name
    except KeyError:  # a local base model removed since: its name is still the best reference
        base_ref = base_model
    config = json.loads((src / CONFIG_FILE).read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = base_ref
    config_bytes = (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()
    with tarfile.open(fileobj=dest, mode="w:gz", compresslevel=6) as archive:
        archive.addfile(_tar_entry(f"{folder}/{CONFIG_FILE}", len(config_bytes), mtime), io.BytesIO(config_bytes))
        for name in (WEIGHTS_FILE, *HEAD_FILES):
            path = src / name
            if name == WEIGHTS_FILE or path.exists():
                with path.open("rb") as data:
                    archive.addfile(_tar_entry(f"{folder}/{name}", path.stat().st_size, mtime), data)


def export_model_archive(src: Path, dest: IO[bytes], folder: str, mtime: float) -> None:
    """Write a full model (a full fine-tuning's version or checkpoint) as a .tar.gz of `folder/` holding the
    directory's files as stored: safetensors weights, config.json, generation config and tokenizer, loadable with
    AutoModelForCausalLM.from_pretrained. Subfolders (checkpoints, resume state) stay out."""
    # compresslevel 1: safetensors weights barely compress, and a whole model is large
    with tarfile.open(fileobj=dest, mode="w:gz", compresslevel=1) as archive:
        for path in sorted(p for p in src.iterdir() if p.is_file()):
            with path.open("rb") as data:
                archive.addfile(_tar_entry(f"{folder}/{path.name}", path.stat().st_size, mtime), data)


def _tar_entry(name: str, size: int, mtime: float) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, int(mtime), 0o644  # no owner names or ids of the server
    return info
