"""Directories on object storage: ``s3://``, ``gs://`` or any pyarrow filesystem URI.

pyarrow.fs is the one filesystem layer. The endpoint and credentials come from the standard
environment (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...), as pyarrow and boto3 read them.
Object storage has no rename, so a directory is published by writing its files under its
final prefix and its ``_SUCCESS`` last (:func:`upload_dir`), and read only when its
``_SUCCESS`` is there (:func:`local_dir`): a reader never takes a half-written directory.

Model directories go through here (``--model s3://bucket/models/m`` for evaluate, score,
serve, export and ``--init-from``; ``ezsasrec train --output s3://...``), and so do prepared
datasets (``ezsasrec prepare --output s3://...``, ``--data s3://...``): a reader copies one to
a local cache once per published version and per node (Ray Data's training reads go to the
URI itself).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
import shutil
import tempfile
import uuid

from . import outputs
from .errors import EzSASRecError
from .outputs import MARKER, written_by_us

CACHE_ENV = "EZSASREC_CACHE"  # where remote directories are copied (default: ~/.cache)


def is_remote(path) -> bool:
    """A URI of a filesystem other than the local one (``file://`` is local)."""
    text = os.fspath(path) if isinstance(path, os.PathLike) else str(path)
    return "://" in text and not text.startswith("file://")


def _filesystem(uri: str):
    import pyarrow.fs as pafs

    try:
        return pafs.FileSystem.from_uri(uri)
    except Exception as exc:  # noqa: BLE001 - a bad URI or an unknown scheme: one line
        raise EzSASRecError(f"{uri}: cannot open ({exc})") from None


def _marker(fs, root: str, uri: str) -> bytes | None:
    import pyarrow.fs as pafs

    path = posixpath.join(root, MARKER)
    try:
        if fs.get_file_info(path).type != pafs.FileType.File:
            return None
        with fs.open_input_stream(path) as f:
            return f.read()
    except OSError as exc:
        raise EzSASRecError(f"{uri}: cannot read ({exc})") from None


def exists(uri: str) -> bool:
    """Whether a complete directory (its ``_SUCCESS`` there) is at ``uri``."""
    fs, root = _filesystem(uri)
    return _marker(fs, root, uri) is not None


def local_dir(path: str) -> str:
    """``path`` itself when local; else a local copy of the remote directory (copied once per
    published version: the cache is keyed by the URI and its ``_SUCCESS``)."""
    if not is_remote(path):
        return path
    import pyarrow.fs as pafs

    fs, root = _filesystem(path)
    marker = _marker(fs, root, path)
    if marker is None:
        raise EzSASRecError(f"{path}: not found, or incomplete (no {MARKER}: still being "
                            "written, or not written by ezsasrec)")
    key = hashlib.sha256(path.encode() + b"\0" + marker).hexdigest()[:16]
    cache = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache",
                                                     "ezsasrec_ray")
    local = os.path.join(cache, key, posixpath.basename(root.rstrip("/")) or "dir")
    if os.path.exists(os.path.join(local, MARKER)):
        return local
    os.makedirs(os.path.dirname(local), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".download-", dir=os.path.dirname(local))
    try:
        pafs.copy_files(root, tmp, source_filesystem=fs,
                        destination_filesystem=pafs.LocalFileSystem())
        os.replace(tmp, local)  # another process may have won the race: theirs is the same
    except OSError as exc:
        if os.path.exists(os.path.join(local, MARKER)):
            return local
        raise EzSASRecError(f"{path}: copy failed ({exc})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return local


def check_output(uri: str, overwrite: bool, *, flag: str = "--output") -> None:
    """Raise unless a directory may be written at ``uri``: a local path as
    :func:`.outputs.check_output` says; a URI with nothing there, or (with overwrite) a
    complete directory of ours."""
    if not is_remote(uri):
        outputs.check_output(uri, overwrite, flag=flag)
        return
    fs, root = _filesystem(uri)
    _clear(fs, root, uri, overwrite, flag, dry_run=True)


@contextlib.contextmanager
def staged(uri: str, *, overwrite: bool, flag: str = "--output"):
    """``with staged(uri, ...) as local:`` write a complete directory (``_SUCCESS`` included)
    at the local path ``local``; it is published at ``uri`` when the block succeeds."""
    check_output(uri, overwrite, flag=flag)
    with tempfile.TemporaryDirectory(prefix="ezsasrec-stage-") as tmp:
        local = os.path.join(tmp, posixpath.basename(uri.rstrip("/")) or "dir")
        yield local
        upload_dir(local, uri, overwrite=overwrite, flag=flag)


def upload_dir(local: str, uri: str, *, overwrite: bool, flag: str = "--output") -> None:
    """Publish a complete local directory (its ``_SUCCESS`` included) at ``uri``: every other
    file first, ``_SUCCESS`` last. An existing directory there is replaced only with
    ``overwrite`` and only when this project wrote it."""
    import pyarrow.fs as pafs

    fs, root = _filesystem(uri)
    _clear(fs, root, uri, overwrite, flag)
    local_fs = pafs.LocalFileSystem()
    for info in local_fs.get_file_info(pafs.FileSelector(local, recursive=True)):
        relative = os.path.relpath(info.path, local)
        if info.type == pafs.FileType.File and relative != MARKER:
            _copy(local_fs, info.path, fs, posixpath.join(root, *relative.split(os.sep)))
    with open(os.path.join(local, MARKER)) as f:
        _put_marker(fs, root, json.load(f))


def _put_marker(fs, root: str, body: dict):
    """Write ``_SUCCESS`` under ``root``, last, with this upload's own id: readers' caches
    tell two uploads apart."""
    with fs.open_output_stream(posixpath.join(root, MARKER)) as out:
        out.write(json.dumps({**body, "upload_id": uuid.uuid4().hex}).encode())


def make_room(uri: str, *, overwrite: bool, flag: str = "--output") -> None:
    """Before writing straight under ``uri`` (Ray Data writes from any node): nothing there,
    or with overwrite a directory of ours, unpublished first (its ``_SUCCESS`` goes first)."""
    fs, root = _filesystem(uri)
    _clear(fs, root, uri, overwrite, flag)


def finish(uri: str, files: dict[str, bytes], *, kind: str) -> None:
    """Complete a directory written under ``uri``: ``files`` (e.g. the manifest), then the
    ``_SUCCESS`` marker last, so readers take it only now."""
    fs, root = _filesystem(uri)
    for name, body in files.items():
        with fs.open_output_stream(posixpath.join(root, name)) as out:
            out.write(body)
    _put_marker(fs, root, outputs.marker_body(kind))


def files_under(uri: str) -> list[tuple[str, object]]:
    """``(name, open_input_file)`` of the files directly under ``uri`` (hidden ones skipped),
    by name."""
    import pyarrow.fs as pafs

    fs, root = _filesystem(uri)
    infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    return sorted(((posixpath.basename(i.path), lambda p=i.path: fs.open_input_file(p))
                   for i in infos if i.type == pafs.FileType.File
                   and not posixpath.basename(i.path).startswith((".", "_"))),
                  key=lambda entry: entry[0])


def publish(local: str, uri: str, *, kind: str, overwrite: bool, flag: str = "--output"):
    """Mark a finished local directory as ours (``_SUCCESS``) and publish it at ``uri``."""
    outputs.write_marker(local, kind)
    upload_dir(local, uri, overwrite=overwrite, flag=flag)


def _copy(source_fs, source: str, dest_fs, dest: str):
    with source_fs.open_input_stream(source) as src, dest_fs.open_output_stream(dest) as out:
        while chunk := src.read(1 << 22):
            out.write(chunk)


def _clear(fs, root: str, uri: str, overwrite: bool, flag: str, dry_run: bool = False):
    """Make room at ``root``: nothing there, or (with overwrite) a directory of ours, whose
    ``_SUCCESS`` goes first so no reader takes it while it is replaced (``dry_run``: only
    check)."""
    import pyarrow.fs as pafs

    if fs.get_file_info(root).type == pafs.FileType.NotFound:
        return
    listed = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    if not listed:
        return
    marker = _marker(fs, root, uri)
    if not overwrite:
        raise EzSASRecError(f"{flag} {uri} already exists (use --overwrite to replace it)")
    if marker is None or not _ours(marker):
        raise EzSASRecError(f"{flag} {uri} holds files this project did not write (no "
                            f"{MARKER} of ours); left untouched")
    if dry_run:
        return
    fs.delete_file(posixpath.join(root, MARKER))
    fs.delete_dir_contents(root, missing_dir_ok=True)


def _ours(marker: bytes) -> bool:
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, MARKER), "wb") as f:
            f.write(marker)
        return written_by_us(tmp)
