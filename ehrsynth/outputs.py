"""Output-path policy: ehrsynth never destroys what it did not write.

Every output directory ehrsynth writes holds a marker, ``.ehrsynth-output.json``, naming its kind (corpus, run,
synthetic, report, demo, model); an output written as a single file gets the marker beside it, as
``.<name>.ehrsynth-output.json``. The rules, checked up front by every command (:func:`check_output`) and again
just before anything is replaced (:func:`staged_output`):

- an existing path that is not an ehrsynth output (no marker, no legacy format files) is never replaced;
- ``--overwrite`` replaces only an ehrsynth output of the same kind;
- an output equal to, inside or containing an input is always refused;
- an output is built in a staging directory beside its target and renamed into place once, so a killed or
  failed run leaves the previous output as it was; staging left by a killed run is removed on the next run.

Staging directories are named ``.ehrsynth-staging-<kind>-<pid>@<host>.<random>``: the pid and host tell a
later run whether their owner is still alive.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

from ehrsynth.errors import OutputError

MARKER = ".ehrsynth-output.json"
MARKER_VERSION = 1
KINDS = ("corpus", "run", "synthetic", "report", "demo", "model")
STAGING_PREFIX = ".ehrsynth-staging-"
_STAGING_NAME = re.compile(r"^\.ehrsynth-staging-[a-z]+-(\d+)@([A-Za-z0-9_]*)\.")

# files each kind writes, for outputs saved before markers existed (recognised so --overwrite still works)
_CORPUS_FILES = {"corpus.json", "vocab.parquet", "patient_ids.npy", "patients.parquet", "visit_offsets.npy",
                 "code_offsets.npy", "codes.npy", "visit_days.npy", "visit_start.npy", "sex.npy", "birth_year.npy",
                 "age_at_first_visit.npy", "death.npy", "labels.npy", "split.npy",
                 "descriptions.json"}  # code names `prepare` saves beside the corpus (evaluation/descriptions.py)
_LEGACY_FILES = {
    "model": {"model.json", "model.safetensors"},
    "run": {"config.json", "metrics.jsonl", "checkpoint", "model"},
    "report": {"metrics.json", "report.html"},
    "demo": {"corpus", "run", "synthetic", "report"},
}
_OWN_HIDDEN = re.compile(r"^(\.ehrsynth-|\.checkpoint\.|\..+\.tmp\.\d+$)")  # our markers, staging, temp files


def marker_path(path: Path) -> Path:
    """Where the marker of output ``path`` lives: inside a directory, beside a file."""
    return path / MARKER if path.is_dir() else path.with_name(f".{path.name}{MARKER}")


def write_marker(path: Path, kind: str) -> None:
    """Mark ``path`` (a directory, or a file via its sidecar) as an ehrsynth output of ``kind``."""
    marker_path(path).write_text(json.dumps({"ehrsynth_output": kind, "version": MARKER_VERSION}) + "\n")


def output_kind(path: str | Path) -> str | None:
    """The kind of ehrsynth output at ``path``, or None when it is not one of ours (or cannot be read)."""
    try:
        return _kind(Path(path))
    except OSError:  # unreadable: not provably ours, so never replaced
        return None


def _kind(path: Path) -> str | None:
    if not os.path.lexists(path) or path.is_symlink():
        return None
    marker = marker_path(path)
    if marker.is_file():
        try:
            kind = json.loads(marker.read_text()).get("ehrsynth_output")
        except (ValueError, UnicodeDecodeError, AttributeError):
            return None
        return kind if kind in KINDS else None
    return _legacy_kind(path) if path.is_dir() else None


def _legacy_kind(path: Path) -> str | None:
    """Recognise an output written before markers, by its files -- and only if it holds nothing else."""
    names = {p.name for p in path.iterdir() if not _OWN_HIDDEN.match(p.name)}
    if not names:
        return None
    if "corpus.json" in names and names <= _CORPUS_FILES:
        try:
            header = json.loads((path / "corpus.json").read_text())
        except (ValueError, UnicodeDecodeError, OSError):
            return None
        if not isinstance(header, dict) or header.get("format") != "ehrsynth-corpus":
            return None
        stats = header.get("stats") if isinstance(header.get("stats"), dict) else {}
        return "synthetic" if stats.get("source") in ("halo", "ehrdiff") else "corpus"
    if names == _LEGACY_FILES["model"] or names == _LEGACY_FILES["report"]:
        return "model" if "model.json" in names else "report"
    if "config.json" in names and names <= _LEGACY_FILES["run"] and len(names) > 1:
        return "run" if '"family"' in (path / "config.json").read_text(errors="replace") else None
    if names <= _LEGACY_FILES["demo"] and all(output_kind(path / n) is not None for n in names):
        return "demo"
    return None


def check_output(path: str | Path, kind: str, *, flag: str, overwrite: bool = False,
                 inputs: Mapping[str, str | Path | None] | None = None,
                 hint: str = "pass --overwrite to replace it") -> Path:
    """Refuse an output path that would destroy something; call it before any work.

    Args:
        path: the output path as the user gave it.
        kind: the kind of output about to be written.
        flag: the option that named ``path``, for messages (e.g. ``'--out'``).
        overwrite: whether an existing ehrsynth output of the same kind may be replaced.
        inputs: ``{flag: path}`` of everything the command reads; ``path`` may not equal, lie inside or contain
            any of them, whatever ``overwrite`` says.
        hint: what the message suggests when the output exists and ``overwrite`` is off.

    Returns:
        The absolute output path.

    Raises:
        OutputError: naming ``flag`` and the path.
    """
    given = Path(path)
    target = absolute(given)
    where = f"{flag} {given}"
    ancestor = target.parent
    while not os.path.lexists(ancestor):
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputError(f"{where}: {ancestor} is a file, so nothing can be written inside it")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputError(f"{where}: no permission to write in {ancestor}")
    if target.is_symlink():
        raise OutputError(f"{where} is a symbolic link; give the path it points to")
    real = target.resolve()
    for input_flag, input_path in (inputs or {}).items():
        if input_path is None:
            continue
        source = Path(input_path).resolve()
        relation = ("is the same path as" if real == source else "is inside" if source in real.parents
                    else "contains" if real in source.parents else None)
        if relation:
            raise OutputError(f"{where} {relation} the input {input_flag} {input_path}; choose an output path "
                              "outside every input")
    if os.path.lexists(target) and not _empty_dir(target):
        found = output_kind(target)
        if found is None:
            raise OutputError(f"{where} already exists and was not written by ehrsynth; refusing to replace it "
                              "(choose a new path)")
        if found != kind:
            raise OutputError(f"{where} holds an ehrsynth {found} output, not a {kind}; choose another path")
        if not overwrite:
            raise OutputError(f"{where} already exists; {hint}")
    if ancestor == target.parent:
        clean_stale(target.parent)
    return target


def absolute(path: str | Path) -> Path:
    """``path`` made absolute with its parent resolved, but its own last component kept (a link stays a link)."""
    path = Path(os.path.abspath(path))
    return path.parent.resolve() / path.name


def _empty_dir(path: Path) -> bool:
    try:
        return path.is_dir() and not path.is_symlink() and next(path.iterdir(), None) is None
    except OSError:
        return False


@contextlib.contextmanager
def staged_output(target: str | Path, kind: str, *, private: bool = False) -> Iterator[Path]:
    """Yield an empty staging directory beside ``target``; on success it becomes ``target`` in one rename.

    The staging directory gets the marker and its permissions (``private``: 0700 directories and 0600 files;
    otherwise the user's umask) before the rename. On any failure it is removed, with the parent folders this
    call created, and ``target`` is left as it was. An existing ``target`` is replaced only when it is an
    ehrsynth output of the same ``kind`` (or an empty directory).

    Raises:
        OutputError: when ``target`` exists and is not ours to replace.
    """
    target = absolute(target)
    created = _make_parents(target.parent)
    staging = None
    try:
        clean_stale(target.parent)
        staging = make_staging(target.parent, kind)
        yield staging
        write_marker(staging, kind)
        set_modes(staging, private=private)
        _check_replaceable(target, kind)  # again, just before the swap: never replace what is not ours
        replace_directory(staging, target, mode=0o700 if private else None)
    except BaseException:
        _remove_created(created)
        raise
    finally:
        if staging is not None and os.path.lexists(staging):
            shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def staged_file(target: str | Path, kind: str = "synthetic") -> Iterator[Path]:
    """Yield a staging file path beside ``target``; on success it replaces ``target`` (marked by a sidecar)."""
    target = absolute(target)
    created = _make_parents(target.parent)
    handle, name = tempfile.mkstemp(prefix=_staging_prefix("file"), dir=target.parent)
    os.close(handle)
    staging = Path(name)
    try:
        clean_stale(target.parent)
        yield staging
        if target.is_dir():
            raise OutputError(f"{target} is a directory; a file cannot replace it")
        _check_replaceable(target, kind)
        set_modes(staging, private=False)
        # the sidecar first: if a kill comes before the rename, it marks the old file (ours too) or nothing
        write_marker(target, kind)
        os.replace(staging, target)
    except BaseException:
        _remove_created(created)
        raise
    finally:
        if os.path.lexists(staging):
            staging.unlink()


@contextlib.contextmanager
def scratch_directory(parent: str | Path, kind: str) -> Iterator[Path]:
    """A working directory beside an output (named as staging, so a killed run's copy is cleaned later)."""
    parent = Path(parent)
    created = _make_parents(parent)
    scratch = make_staging(parent, kind)
    try:
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        _remove_created(created)


def _check_replaceable(target: Path, kind: str) -> None:
    if os.path.lexists(target) and not _empty_dir(target):
        found = output_kind(target)
        if found != kind:
            what = "was not written by ehrsynth" if found is None else f"holds an ehrsynth {found} output"
            raise OutputError(f"{target} {what}; refusing to replace it with a {kind}")


def remove_output(target: str | Path, kind: str) -> None:
    """Delete an existing ehrsynth output of ``kind`` (for ``train --overwrite``); anything else is refused."""
    target = absolute(target)
    _check_replaceable(target, kind)
    if os.path.lexists(target):
        shutil.rmtree(target)


def _staging_prefix(kind: str, pid: int | None = None) -> str:
    host = re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname())[:40]
    return f"{STAGING_PREFIX}{kind}-{os.getpid() if pid is None else pid}@{host}."


def make_staging(parent: Path, kind: str, *, pid: int | None = None, name: str | None = None) -> Path:
    """A new staging directory in ``parent``; ``pid`` names the process whose life it is tied to."""
    if name is None:
        return Path(tempfile.mkdtemp(prefix=_staging_prefix(kind, pid), dir=parent))
    path = parent / (_staging_prefix(kind, pid) + name)
    path.mkdir(exist_ok=True)
    return path


def clean_stale(parent: str | Path) -> int:
    """Remove staging left in ``parent`` by killed runs of this host (their pid is gone); returns how many."""
    removed = 0
    host = re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname())[:40]
    try:
        entries = list(Path(parent).iterdir())
    except OSError:
        return 0
    for entry in entries:
        match = _STAGING_NAME.match(entry.name)
        if not match or match.group(2) != host or _alive(int(match.group(1))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                entry.unlink()
        removed += 1
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def replace_directory(staging: Path, target: Path, *, mode: int | None = None) -> None:
    """Move a fully written ``staging`` directory to ``target`` in one step, replacing what was there.

    ``mode`` is given to ``staging`` first (default: 0777 less the umask, as ``mkdtemp`` makes it 0700). No
    copy of the old version is kept: on Linux the two directories are swapped atomically and the old one,
    now under the staging name, is deleted at once (a kill in between leaves it as stale staging, cleaned by
    the next run). Elsewhere the old one is moved aside for the instant between two renames, put back if
    the second fails, and deleted right after.
    """
    os.chmod(staging, (0o777 & ~current_umask()) if mode is None else mode)
    if not os.path.lexists(target) or _empty_dir(target):
        os.replace(staging, target)
        return
    if _exchange(staging, target):
        shutil.rmtree(staging, ignore_errors=True)
        return
    aside = staging.with_name(staging.name + "-replaced")  # a staging name: cleaned if a kill strands it
    os.replace(target, aside)
    try:
        os.replace(staging, target)
    except BaseException:
        os.replace(aside, target)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where that is unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV):
        return False
    raise OSError(code, os.strerror(code), str(b))


def current_umask() -> int:
    """The process umask (read without changing it where /proc allows)."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        status = Path("/proc/self/status").read_text()
        return int(next(line for line in status.splitlines() if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def set_modes(root: Path, *, private: bool) -> None:
    """Give ``root`` and everything in it private (0700/0600) or umask-following permissions."""
    umask = current_umask()
    dir_mode, file_mode = (0o700, 0o600) if private else (0o777 & ~umask, 0o666 & ~umask)
    if root.is_file():
        os.chmod(root, file_mode)
        return
    for folder, _dirs, files in os.walk(root):
        os.chmod(folder, dir_mode)
        for name in files:
            os.chmod(os.path.join(folder, name), file_mode)


def _make_parents(parent: Path) -> list[Path]:
    """Create ``parent`` and missing ancestors; returns those created, deepest first."""
    created = []
    probe = parent
    while not os.path.lexists(probe):
        created.append(probe)
        probe = probe.parent
    if os.path.lexists(probe) and not probe.is_dir():
        raise OutputError(f"{probe} is a file, so nothing can be written inside it")
    parent.mkdir(parents=True, exist_ok=True)
    return created


def _remove_created(created: list[Path]) -> None:
    for folder in created:
        try:
            folder.rmdir()
        except OSError:
            break


__all__ = ["KINDS", "MARKER", "absolute", "check_output", "clean_stale", "current_umask", "make_staging",
           "output_kind", "remove_output", "replace_directory", "scratch_directory", "set_modes", "staged_file",
           "staged_output", "write_marker"]
