"""One way to write an output directory: temporary sibling, write, marker, rename into place.

Every directory the project writes (prepared data, models, scores, logs) goes through
:func:`writing` (or :func:`start` + :func:`publish` + :func:`discard`):

* the work happens in ``.{name}.tmp-{host}-{pid}-{hex}`` next to the output, on the same
  filesystem, so the final rename is atomic and readers never see half an output;
* ``_SUCCESS`` (a small JSON saying who wrote it) goes in last, so its presence means "complete";
* ``--overwrite`` replaces only an empty directory or one this project wrote, never a user's;
* temporaries of killed runs (dead pid on this host, or a day old) are removed by the next run.

Local or shared filesystem paths only (``file://`` is accepted); pure standard library.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

from .errors import EzSASRecError

MARKER = "_SUCCESS"
WRITTEN_BY = "ezsasrec_ray"
MARKER_FORMAT_VERSION = 1
# Other hosts' pids cannot be checked, so their temporaries are stale only after this long.
STALE_AFTER_S = 24 * 3600


# --------------------------------------------------------------------------------------------
# Paths and names


def _local(path, flag: str) -> tuple[str, str]:
    """``(shown, absolute)`` for a local path; ``shown`` is what error messages print."""
    shown = os.fspath(path).removeprefix("file://")
    scheme = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://", shown)
    if scheme:
        raise EzSASRecError(f"{flag} {shown}: write to a local or shared filesystem path "
                            f"({scheme.group(1)}:// is not supported; atomic rename needs one)")
    full = os.path.abspath(shown)
    if not os.path.basename(full):
        raise EzSASRecError(f"{flag} {shown}: not a usable output path")
    return shown, full


def _host() -> str:
    # Dots are replaced too: then the text after the last "." of a temporary's name is always
    # "tmp-{host}-{pid}-{hex}", so one output's temporaries never match another output's name.
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())[:64] or "host"


def _hex() -> str:
    return uuid.uuid4().hex[:8]


def _temp_name(full: str) -> str:
    base = os.path.basename(full)
    return os.path.join(os.path.dirname(full),
                        f".{base}.tmp-{_host()}-{os.getpid()}-{_hex()}")


def _temp_pattern(base: str) -> re.Pattern:
    return re.compile(rf"\.{re.escape(base)}\.tmp-([A-Za-z0-9_-]+)-(\d+)-[0-9a-f]{{8}}")


def _old_pattern(base: str) -> re.Pattern:
    return re.compile(rf"\.{re.escape(base)}\.old-[0-9a-f]{{8}}")


def _is_temp(path: str) -> bool:
    name = os.path.basename(os.path.abspath(path))
    return bool(re.fullmatch(r"\..+\.tmp-[A-Za-z0-9_-]+-\d+-[0-9a-f]{8}", name))


# --------------------------------------------------------------------------------------------
# Small filesystem helpers


def _umask() -> int:
    # /proc avoids os.umask's set-and-restore, which races with other threads creating files.
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _is_empty_dir(path: str) -> bool:
    try:
        with os.scandir(path) as entries:
            return next(entries, None) is None
    except OSError:
        return False


def _remove(path: str):
    """Remove a file, link or directory tree; best effort (a later run retries)."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _fsync_dir(path: str):
    # Makes the rename / new entries durable; not possible everywhere, hence best effort.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _mtime_age(path: str) -> float:
    try:
        return time.time() - os.lstat(path).st_mtime
    except OSError:
        return 0.0


def _pid_alive(pid: int) -> bool:
    if os.name != "posix":  # os.kill on Windows terminates the process: never probe there
        return True
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive but someone else's; anything else: keep to be safe
        return True
    return True


# --------------------------------------------------------------------------------------------
# Recognising our outputs


def written_by_us(path) -> bool:
    """True when ``path`` is a directory this project wrote (marker, or an older version's)."""
    full = os.path.abspath(os.fspath(path).removeprefix("file://"))
    if not os.path.isdir(full):
        return False
    marker = os.path.join(full, MARKER)
    with contextlib.suppress(OSError):
        if os.path.getsize(marker) > 0:
            # A non-empty marker decides alone: other tools (Hadoop's S3A committer) also
            # write a JSON _SUCCESS, and those directories are not ours.
            body = _read_json(marker)
            return isinstance(body, dict) and body.get("written_by") == WRITTEN_BY
    return _legacy_output(full)


def _legacy_output(full: str) -> bool:
    """Outputs of versions before the JSON marker: prepared data / scores, or a model."""
    manifest = _read_json(os.path.join(full, "manifest.json"))
    if isinstance(manifest, dict) and "format_version" in manifest:
        return True
    metrics = _read_json(os.path.join(full, "metrics.json"))
    return (isinstance(metrics, dict) and "format_version" in metrics
            and os.path.isfile(os.path.join(full, "config.json")))


def check_output(path, overwrite: bool, *, flag: str = "--output") -> None:
    """Raise unless ``path`` may be written: absent, or (with overwrite) empty or ours.

    Never deletes anything.
    """
    shown, full = _local(path, flag)
    if not os.path.lexists(full):
        return
    if not overwrite:
        raise EzSASRecError(f"{flag} {shown}: already exists; pass --overwrite to replace it")
    if os.path.islink(full):
        raise EzSASRecError(f"{flag} {shown}: is a symbolic link, not a directory written by "
                            "ezsasrec_ray; left untouched (remove it or choose another path)")
    if not os.path.isdir(full):
        raise EzSASRecError(f"{flag} {shown}: is a file, not a directory written by "
                            "ezsasrec_ray; left untouched (remove it or choose another path)")
    if _is_empty_dir(full) or written_by_us(full):
        return
    raise EzSASRecError(f"{flag} {shown}: exists and was not written by ezsasrec_ray (no "
                        f"{MARKER} marker); left untouched (remove it or choose another path)")


# --------------------------------------------------------------------------------------------
# Leftovers of killed runs


def cleanup_stale(path) -> list[str]:
    """Remove temporaries of ``path`` left by killed runs; returns the removed paths.

    Only ``.{name}.tmp-{host}-{pid}-{hex}`` (dead pid on this host, or older than a day) and
    ``.{name}.old-{hex}`` are touched. An ``.old`` whose output is missing is the previous
    output of a replace killed between its two renames: it is put back, not removed.
    """
    full = os.path.abspath(os.fspath(path).removeprefix("file://"))
    parent, base = os.path.dirname(full), os.path.basename(full)
    try:
        names = os.listdir(parent)
    except OSError:
        return []
    temp, old = _temp_pattern(base), _old_pattern(base)
    stale = [os.path.join(parent, n) for n in names
             if (m := temp.fullmatch(n)) and _temp_is_stale(os.path.join(parent, n), *m.groups())]
    olds = [os.path.join(parent, n) for n in names if old.fullmatch(n)]
    if olds and not os.path.lexists(full):
        newest = min(olds, key=_mtime_age)
        with contextlib.suppress(OSError):
            os.rename(newest, full)
            olds.remove(newest)
    if not os.path.lexists(full):
        olds = []  # could not put one back: keep them all rather than lose the last output
    for leftover in stale + olds:
        _remove(leftover)
    return stale + olds


def _temp_is_stale(path: str, host: str, pid: str) -> bool:
    if host == _host():
        return not _pid_alive(int(pid))
    return _mtime_age(path) > STALE_AFTER_S


# --------------------------------------------------------------------------------------------
# Writing


def start(path, *, overwrite: bool, flag: str = "--output") -> str:
    """Check ``path``, clear stale temporaries and return a new empty temporary sibling."""
    shown, full = _local(path, flag)
    cleanup_stale(full)  # first: it may put back an output a killed replace had moved aside
    check_output(path, overwrite, flag=flag)
    tmp = _temp_name(full)
    try:
        os.makedirs(os.path.dirname(full), exist_ok=True)
        os.mkdir(tmp)  # 0o777 & ~umask, unlike tempfile.mkdtemp's 0o700
    except OSError as exc:
        raise EzSASRecError(f"{flag} {shown}: cannot create {tmp}: "
                            f"{exc.strerror or exc}") from exc
    return tmp


def marker_body(kind: str, extra: dict | None = None) -> dict:
    """What ``_SUCCESS`` says: who wrote the directory, what it is, when."""
    body = {"written_by": WRITTEN_BY, "kind": kind, "format_version": MARKER_FORMAT_VERSION,
            "written_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    # The identifying keys win over extra ones, so a caller cannot make a marker unreadable.
    body.update({k: v for k, v in (extra or {}).items() if k not in body})
    return body


def write_marker(tmp: str, kind: str, extra: dict | None = None):
    """Write ``_SUCCESS`` (:func:`marker_body`) into a finished directory."""
    body = marker_body(kind, extra)
    with open(os.path.join(tmp, MARKER), "w") as f:
        json.dump(body, f, indent=2, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def publish(tmp: str, path, *, kind: str, extra: dict | None = None, overwrite: bool = True,
            flag: str = "--output") -> None:
    """Write the marker into ``tmp`` and rename it to ``path``, replacing a previous output."""
    shown, full = _local(path, flag)
    os.chmod(tmp, 0o777 & ~_umask())  # callers' mkdtemp directories would stay 0o700
    write_marker(tmp, kind, extra)
    _fsync_dir(tmp)
    check_output(path, overwrite, flag=flag)  # it may have appeared while we were writing
    aside = _move_aside(full, shown, flag)
    try:
        os.rename(tmp, full)
    except OSError as exc:
        if aside:
            # If this fails too, the next start() puts the .old directory back.
            with contextlib.suppress(OSError):
                os.rename(aside, full)
        raise EzSASRecError(f"{flag} {shown}: cannot move the finished output into place: "
                            f"{exc.strerror or exc}") from exc
    _fsync_dir(os.path.dirname(full))
    if aside:
        _remove(aside)


def _move_aside(full: str, shown: str, flag: str) -> str | None:
    if not os.path.lexists(full):
        return None
    aside = os.path.join(os.path.dirname(full), f".{os.path.basename(full)}.old-{_hex()}")
    try:
        os.rename(full, aside)
    except OSError as exc:
        raise EzSASRecError(f"{flag} {shown}: cannot move the previous output aside: "
                            f"{exc.strerror or exc}") from exc
    return aside


def discard(tmp: str | None) -> None:
    """Remove a temporary from :func:`start` (missing is fine); for ``finally:`` blocks."""
    if not tmp:
        return
    if not _is_temp(tmp):  # a caller mix-up must never delete an output
        raise EzSASRecError(f"discard {tmp}: not a temporary output directory; left untouched")
    _remove(tmp)


@dataclass
class Pending:
    """An output being written: write files into ``tmp``; ``extra`` goes into the marker."""

    path: str
    tmp: str
    extra: dict = field(default_factory=dict)


@contextlib.contextmanager
def writing(path, *, overwrite: bool, kind: str, flag: str = "--output",
            extra: dict | None = None) -> Iterator[Pending]:
    """``with writing(out, overwrite=o, kind="scores") as w:`` write into ``w.tmp``.

    Published to ``path`` when the block succeeds; on any exception the temporary is removed
    and a previous output stays as it was.
    """
    pending = Pending(path=os.fspath(path), tmp=start(path, overwrite=overwrite, flag=flag),
                      extra=dict(extra or {}))
    try:
        yield pending
        publish(pending.tmp, pending.path, kind=kind, extra=pending.extra,
                overwrite=overwrite, flag=flag)
    finally:
        discard(pending.tmp)  # gone already after a publish


def write_json_atomic(path, obj) -> None:
    """Write ``obj`` as JSON to a temporary sibling, fsync it and rename it over ``path``."""
    _, full = _local(path, "write_json_atomic")
    os.makedirs(os.path.dirname(full), exist_ok=True)
    cleanup_stale(full)
    tmp = _temp_name(full)
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, default=str)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, full)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
