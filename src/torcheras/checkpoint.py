"""The one home of state files: atomic writes, safe loads, formats.

Every file torcheras writes goes through :func:`atomic_write`: a temp file in the same folder,
flushed and fsynced, then ``os.replace``d over the target and the folder fsynced. A process
killed at any point leaves either the old file or the new one, never a truncated one.
Every file is read with ``torch.load(weights_only=True)`` (or safetensors), so a checkpoint
cannot run code when it is loaded.

Callbacks that save during training (ModelCheckpoint, BackupAndRestore) write in the
background: :func:`save_in_background` copies the state (training waits for the copy only),
then a writer thread writes it. A second save waits for the first; ``fit`` returns, or its
exception leaves, only once the last write has landed or failed (:func:`wait_for_writes`).
Each thread that trains has its own writer: fits in several threads (Optuna's ``n_jobs``, a
thread pool) neither wait for nor raise each other's writes.

A path that is a URL (``s3://``, ``gs://``, ``memory://``...) goes through fsspec (the
``fsspec`` extra): written whole in one PUT on object stores, read whole into memory and
loaded the same safe way (:func:`is_url`). ``file://`` URLs are local paths; local paths never
import fsspec.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import pickle
import re
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import torch

from torcheras import distributed
from torcheras.tensors import to_cpu

__all__ = [
    "CheckpointError",
    "FORMAT",
    "atomic_write",
    "save",
    "save_in_background",
    "wait_for_writes",
    "load",
    "save_weights",
    "load_weights_into",
    "state_dict_of",
    "describe",
    "is_url",
    "location",
    "read_bytes",
    "ObjectAppender",
]

FORMAT = "torcheras.checkpoint"
# 2: ModelCheckpoint's full files are saved models (kind "model", every optimizer), as
# model.save writes them; 1 wrote them as kind "checkpoint" with one "optimizer". Both load.
FORMAT_VERSION = 2
TEMP_PREFIX = ".torcheras-tmp-"


class CheckpointError(OSError):
    """A state file could not be written or read; the message names the path and the cause."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """There is no file at the path given."""


# Temp files older than this process cannot belong to a write of ours still under way; a
# sweep leaves younger ones alone (another process may be writing them right now).
_PROCESS_START = time.time()


def _check_parents(target: Path) -> None:
    """A clear error when a folder on the way to ``target`` is a file."""
    for parent in reversed(target.parents):
        if parent.exists() and not parent.is_dir():
            raise CheckpointError(
                errno.ENOTDIR,
                f"Cannot save to {str(target)!r}: {str(parent)!r} is a file, not a folder. "
                "Choose another path, or move that file away.",
            )


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform/filesystem lets us open a folder
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(
    path: str | os.PathLike[str], write: Callable[[IO[bytes]], None], *, every_rank: bool = False
) -> Path | str:
    """Write a file so that readers only ever see the old or the complete new content.

    ``write`` receives a binary file object. The parent folder is created if missing; the file
    is created as ``open()`` creates one (``0o666`` less the umask in force). Temp files that
    earlier, interrupted writes to the same target left behind are removed once the new file
    is in place — only those older than this process, so a concurrent writer's temp file is
    never touched.

    A URL (``s3://bucket/run/best.pt``, ``gs://``, ``memory://``) is written through fsspec:
    the content is built in memory, then sent in one PUT on object stores (S3, GCS, Azure,
    ``memory://``: a reader sees the old object or the new one whole, a killed writer leaves
    the old one), elsewhere to a temp key moved over the target. Returns the local ``Path``,
    or the URL.
    """
    target = location(path)
    if not (every_rank or distributed.is_main()):  # under torchrun, rank 0 alone writes
        # training's files; ``every_rank``: a file the user asked this rank for
        return target
    if isinstance(target, str):
        return _write_url(target, write)
    if target.is_dir():
        raise CheckpointError(
            errno.EISDIR,
            f"Cannot save to {str(target)!r}: it is an existing directory. Pass a file path "
            "such as 'ckpt/best.pt'.",
        )
    _check_parents(target)
    folder = target.parent if str(target.parent) else Path(".")
    tmp_name = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = _create_temp(folder, target.name)
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, target)
        tmp_name = None
        _fsync_dir(folder)
    except (OSError, RuntimeError) as exc:
        cause = _os_error_in(exc)  # torch's zip writer wraps a failed write in a RuntimeError
        if cause is None or isinstance(exc, CheckpointError):
            raise
        raise file_error(target, cause, "save", "Files saved earlier are unchanged.") from exc
    finally:
        if tmp_name is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp_name)
    for stale in folder.glob(f"{TEMP_PREFIX}{target.name}.*"):
        with contextlib.suppress(OSError):
            if stale.stat().st_mtime < _PROCESS_START:
                stale.unlink()
    return target


def _write_url(url: str, write: Callable[[IO[bytes]], None]) -> str:
    fs, path = _filesystem(url)  # fsspec missing: its ImportError, as it is
    buffer = io.BytesIO()
    write(buffer)
    try:
        _put(fs, path, buffer.getvalue())
    except Exception as exc:
        raise _store_error(url, exc, "save", "What was saved there before is unchanged.") from exc
    return url


def _create_temp(folder: Path, name: str) -> tuple[int, str]:
    """A new temp file next to the target, created as ``open()`` creates files: the mode is
    ``0o666`` less the umask in force now (``tempfile.mkstemp`` would give 0600, and reading
    the umask means changing it, which races with other threads)."""
    for _ in range(100):
        path = os.path.join(folder, f"{TEMP_PREFIX}{name}.{os.urandom(6).hex()}")
        try:
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), path
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, f"No free temp name in {str(folder)!r}")


class _Writer:
    """A background thread that writes files in order, and remembers a failure. One per
    training thread (:func:`_writer`); a lock keeps it whole if another thread waits on it."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._lock = threading.Lock()

    def submit(self, write: Callable[[], Any], what: str) -> None:
        with self._lock:
            self._wait()  # one write at a time, in order; an earlier failure raises here
            thread = threading.Thread(
                target=self._run, args=(write,), name=f"torcheras-writer ({what})", daemon=False
            )
            thread.start()
            self._thread = thread

    def _run(self, write: Callable[[], Any]) -> None:
        try:
            write()
        except BaseException as exc:  # handed to the training thread by wait()
            self._error = exc

    def wait(self) -> None:
        with self._lock:
            self._wait()

    def _wait(self) -> None:
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()
        error, self._error = self._error, None
        if error is not None:
            raise error


_WRITERS = threading.local()


def _writer() -> _Writer:
    """This thread's writer: a fit's saves queue behind its own earlier saves only."""
    writer = getattr(_WRITERS, "writer", None)
    if writer is None:
        writer = _WRITERS.writer = _Writer()
    return writer


def save_in_background(write: Callable[[], Any], what: str = "checkpoint") -> None:
    """Run ``write`` (which writes files from a snapshot it holds) on this thread's writer,
    after its previous write has finished. Raises that previous write's error, if any."""
    _writer().submit(write, what)


def wait_for_writes(during: BaseException | None = None) -> None:
    """Block until the background write in progress has landed; raise its error. Given the
    exception already leaving ``fit`` (``during``), a failed write is added to it as a note
    instead, so the original error is never masked."""
    if during is None:
        _writer().wait()
        return
    try:
        _writer().wait()
    except BaseException as exc:
        if hasattr(during, "add_note"):
            during.add_note(f"(a checkpoint written in the background also failed: {exc!r})")


_HINTS = {
    errno.ENOSPC: "The disk is full: free space or write elsewhere.",
    errno.EDQUOT: "The disk quota is used up: free space or write elsewhere.",
    errno.EACCES: "Check the folder's permissions or choose another path.",
    errno.EPERM: "Check the folder's permissions or choose another path.",
    errno.EROFS: "The filesystem is read-only: choose another path.",
    errno.EFBIG: "A file-size limit was reached (ulimit -f): raise it or write less.",
    errno.ENOTDIR: "A folder on the way is a file: choose another path, or move it away.",
    errno.EISDIR: "The path is a folder: pass a file name.",
}


def file_error(
    path: str | os.PathLike[str], cause: OSError, action: str = "write", after: str = ""
) -> CheckpointError:
    """The error every file failure raises: the path, the cause and the fix (``after``: what
    is left as it was)."""
    reason = cause.strerror or str(cause) or type(cause).__name__
    hint = _HINTS.get(cause.errno or 0, "")
    parts = [f"Could not {action} {str(path)!r}: {reason}.", hint, after]
    return CheckpointError(cause.errno or errno.EIO, " ".join(p for p in parts if p))


def append_whole(path: str | os.PathLike[str], data: bytes) -> None:
    """Append ``data`` to a file whole or not at all (:func:`write_whole`). A URL has no
    append: the object is read and written back whole (:class:`ObjectAppender`)."""
    if is_url(path):
        where = location(path)
        if isinstance(where, str):
            write_whole(ObjectAppender(where, create=False), data, where)  # type: ignore[arg-type]
            return
        path = where
    with naming_file_errors(path, "open"):
        handle = open(path, "ab", buffering=0)  # noqa: SIM115 - closed below
    with handle:
        write_whole(handle, data, path)


def write_whole(handle: IO[bytes], data: bytes, path: str | os.PathLike[str]) -> None:
    """Write ``data`` at the position of an unbuffered binary ``handle``, whole or not at all:
    a write cut short (a full disk) is cut back off, and raised naming ``path``, the cause and
    the fix. A CSV never holds half a row."""
    start = handle.tell()
    try:
        view = memoryview(data)
        while view:
            view = view[handle.write(view) :]
    except OSError as exc:
        with contextlib.suppress(OSError):
            handle.truncate(start)
            handle.seek(start)
        if isinstance(exc, CheckpointError):  # already names the path (a URL's store)
            raise
        raise file_error(path, exc, "write", "What was written before is kept whole.") from exc


@contextlib.contextmanager
def naming_file_errors(path: str | os.PathLike[str], action: str = "write") -> Iterator[None]:
    """Re-raise an OSError from the block (or one a library wrapped, such as torch's zip
    writer's RuntimeError) as :func:`file_error`'s, naming ``path``, the cause and the fix."""
    try:
        yield
    except CheckpointError:
        raise
    except (OSError, RuntimeError) as exc:
        cause = _os_error_in(exc)
        if cause is None:
            raise
        if cause.errno in (errno.EEXIST, errno.ENOTDIR):  # a file where a folder should be
            _check_parents(Path(path) / "_")
        raise file_error(path, cause, action) from exc


def _os_error_in(exc: BaseException) -> OSError | None:
    """The OSError behind ``exc`` (itself, or one it was raised from or while handling)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def is_safetensors(path: str | os.PathLike[str]) -> bool:
    return str(path).endswith(".safetensors")


# --- URLs (fsspec) -------------------------------------------------------------------------------
# A path such as ``s3://bucket/run/best.pt`` goes through fsspec; ``file://`` URLs become local
# paths (and keep the local, rename-based atomicity); every other path never imports fsspec.
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]+://")  # two letters at least: not C:\ or C:/
# Stores where one PUT (or a multipart upload, completed at its end) replaces an object whole:
# readers see the old object or the new one. Elsewhere: a temp key, then a move.
OBJECT_STORES = frozenset(
    {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss", "r2", "memory"}
)


def is_url(path: Any) -> bool:
    """Whether ``path`` is a URL (``scheme://...``) that fsspec handles rather than a local
    path. ``pathlib.Path`` objects are always local."""
    return isinstance(path, str) and "://" in path and _URL.match(path) is not None


def location(path: str | os.PathLike[str]) -> Path | str:
    """A local ``Path``, or the URL as a string (``Path`` would fold its ``//``); a
    ``file://`` URL is its local path."""
    if is_url(path):
        text = str(path)
        if not text.lower().startswith("file://"):
            return text
        from urllib.parse import urlsplit
        from urllib.request import url2pathname

        return Path(url2pathname(urlsplit(text).path))
    return Path(path)


def local_folder(path: str | os.PathLike[str], what: str) -> Path:
    """A folder that must be local (TensorBoard's event files are appended to as training
    goes); a URL is refused, naming ``what`` and the fix."""
    where = location(path)
    if isinstance(where, str):
        raise ValueError(
            f"{what}: {where!r} is a URL, but TensorBoard logs are written to a local folder "
            "(event files grow as training goes). Pass a local folder, and copy it to the "
            "store after training (or point TensorBoard at the local folder)."
        )
    return where


def join(folder: Path | str, name: str) -> Path | str:
    """``folder / name`` for a local folder or a URL."""
    if isinstance(folder, str):
        return f"{folder.rstrip('/')}/{name}"
    return folder / name


def parent(path: Path | str) -> str:
    """The folder of a local path or a URL, for messages."""
    return path.rsplit("/", 1)[0] if isinstance(path, str) else str(path.parent)


def _filesystem(url: str) -> tuple[Any, str]:
    """fsspec's filesystem for ``url`` and the path inside it. Options (endpoint, credentials)
    come from the store's own environment variables (``AWS_ENDPOINT_URL``,
    ``AWS_ACCESS_KEY_ID``...) or ``fsspec.config.conf[protocol]``."""
    try:
        import fsspec.core
    except ImportError:
        raise ImportError(
            f"{url!r} is a URL: saving to and loading from URLs needs fsspec: "
            "pip install 'torcheras[fsspec]' (and the store's own package, e.g. "
            "'torcheras[s3]' for s3://)."
        ) from None
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as exc:
        raise ImportError(
            f"{url!r} needs a package fsspec does not have: {exc} (for s3://: "
            "pip install 'torcheras[s3]')."
        ) from exc
    except ValueError as exc:
        raise ValueError(f"{url!r}: fsspec cannot use this URL ({exc}).") from exc


def _store_error(url: str, exc: BaseException, action: str, after: str = "") -> CheckpointError:
    """The error a failed read or write of ``url`` raises: the URL, the store's reason and
    what to check."""
    reason = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, PermissionError):
        code, hint = (
            errno.EACCES,
            (
                "Check the credentials for this store (for S3: AWS_ACCESS_KEY_ID / "
                "AWS_SECRET_ACCESS_KEY or AWS_PROFILE) and their rights on the bucket."
            ),
        )
    elif isinstance(exc, FileNotFoundError):
        code, hint = errno.ENOENT, "Check the URL: does its bucket (or container) exist?"
    else:
        code, hint = getattr(exc, "errno", None) or errno.EIO, ""
    text = f"Could not {action} {url!r}: {reason} ({type(exc).__name__})."
    error_class = CheckpointNotFoundError if code == errno.ENOENT else CheckpointError
    return error_class(code, " ".join(p for p in (text, hint, after) if p))


def _put(fs: Any, path: str, data: bytes) -> None:
    """Write ``data`` at ``path`` of the fsspec filesystem ``fs`` so that readers see the old
    object or the new one whole."""
    protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    if protocols & OBJECT_STORES:
        fs.pipe_file(path, data)  # one PUT (a multipart upload is completed in one call too)
        return
    folder, _, name = path.rpartition("/")
    temp = (
        f"{folder}/{TEMP_PREFIX}{name}.{os.urandom(6).hex()}" if folder else f"{TEMP_PREFIX}{name}"
    )
    try:
        fs.pipe_file(temp, data)
        fs.mv(temp, path)
    finally:
        with contextlib.suppress(Exception):
            if fs.exists(temp):
                fs.rm(temp)


def read_bytes(path: str | os.PathLike[str]) -> bytes:
    """The whole content of a local file or a URL; a failure names the path or URL."""
    where = location(path)
    if isinstance(where, Path):
        with naming_file_errors(where, "read"):
            return where.read_bytes()
    fs, inner = _filesystem(where)
    try:
        return fs.cat_file(inner)
    except Exception as exc:
        raise _store_error(where, exc, "read") from exc


def exists(path: Path | str) -> bool:
    """Whether a file exists at a local path or a URL."""
    if isinstance(path, Path):
        return path.exists()
    fs, inner = _filesystem(path)
    try:
        return bool(fs.exists(inner))
    except Exception as exc:
        raise _store_error(path, exc, "look for") from exc


def remove(path: Path | str) -> None:
    """Delete a file (local or URL) if it is there."""
    if isinstance(path, Path):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return
    fs, inner = _filesystem(path)
    try:
        if fs.exists(inner):
            fs.rm_file(inner)
    except Exception as exc:
        raise _store_error(path, exc, "delete") from exc


def copy_over(source: Path | str, target: Path | str) -> None:
    """Keep ``source`` as ``target``: a rename for local files; a server-side copy for URLs
    (``source`` stays, whole, until it is overwritten)."""
    if isinstance(source, Path):
        os.replace(source, target)
        return
    fs, inner = _filesystem(source)
    _, target_inner = _filesystem(str(target))
    try:
        fs.copy(inner, target_inner)
    except Exception as exc:
        raise _store_error(str(target), exc, "copy a backup to") from exc


def download_folder(url: str, folder: Path) -> None:
    """Copy every file under the URL ``url`` into the local ``folder`` (their modification
    times kept where the store gives them): what ``torcheras report`` reads a run from."""
    fs, root = _filesystem(url)
    try:
        if not fs.isdir(root):
            raise FileNotFoundError(f"no folder (prefix) {root!r} in this store")
        prefix = root.rstrip("/") + "/"
        for name in fs.find(root):
            if not name.startswith(prefix):
                continue
            dest = folder.joinpath(*name[len(prefix) :].split("/"))
            dest.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(name, str(dest))
            with contextlib.suppress(Exception):  # not every store tells
                stamp = fs.modified(name).timestamp()
                os.utime(dest, (stamp, stamp))
    except Exception as exc:
        raise _store_error(url, exc, "read the run folder") from exc


class ObjectAppender:
    """A file opened for appending on a store that cannot append (S3 and the like): its
    content is kept in memory and every write replaces the object whole, with one PUT. Opening
    it writes the object at once, so a missing bucket or wrong credentials fail before
    training starts. For logs of one row per epoch (CSVLogger); the object is rewritten whole
    each time, so it suits small files."""

    def __init__(self, url: str, create: bool = True) -> None:
        self.url = url
        self._fs, self._path = _filesystem(url)
        try:
            data = read_bytes(url)
        except CheckpointNotFoundError:
            data = b""
        self._data = bytearray(data)
        self._position = len(data)
        if create:
            try:
                _put(self._fs, self._path, bytes(self._data))
            except Exception as exc:
                raise _store_error(url, exc, "open") from exc

    def tell(self) -> int:
        return self._position

    def seek(self, position: int) -> int:
        self._position = position
        return position

    def truncate(self, size: int | None = None) -> int:
        size = self._position if size is None else size
        del self._data[size:]
        return size

    def write(self, data: bytes | memoryview) -> int:
        end = self._position + len(data)
        self._data[self._position : end] = data
        self._position = end
        try:
            _put(self._fs, self._path, bytes(self._data))
        except Exception as exc:  # write_whole cuts the buffer back and raises this
            raise _store_error(self.url, exc, "write") from exc
        return len(data)

    def getvalue(self) -> bytes:
        return bytes(self._data)

    def close(self) -> None:
        """Nothing to flush: every write reached the store."""


def save(obj: Mapping[str, Any], path: str | os.PathLike[str]) -> Path | str:
    """Save a dict of tensors and plain values atomically (``torch.save`` format), streamed
    straight into the temp file."""
    state = dict(obj)
    return atomic_write(path, lambda f: torch.save(state, f))


def save_weights(
    state_dict: Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    metadata: Mapping[str, Any] | None = None,
) -> Path | str:
    """Save weights: safetensors for ``.safetensors`` names; otherwise the bare state_dict
    (``torch.save(net.state_dict())``'s format, what ``torch.load`` users expect), or, given
    ``metadata`` (the epoch and logs of a ModelCheckpoint file), our format around it."""
    if is_safetensors(path):
        try:
            from safetensors.torch import save as st_save
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError(
                "Saving '.safetensors' files needs the safetensors package: "
                "pip install 'torcheras[safetensors]'."
            ) from exc
        tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}
        meta = {k: str(v) for k, v in (metadata or {}).items()}
        data = st_save(tensors, metadata=meta or None)
        return atomic_write(path, lambda f: f.write(data))
    if not metadata:
        return save(to_cpu(dict(state_dict)), path)
    payload: dict[str, Any] = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "kind": "weights",
        "model": to_cpu(state_dict),
    }
    if metadata:
        payload.update(metadata)
    return save(payload, path)


def load(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a state file safely. Raises :class:`CheckpointError` naming the path and the cause.

    A URL is read whole through fsspec into memory, then loaded the same way."""
    target = location(path)
    if isinstance(target, str):
        try:
            data = read_bytes(target)
        except CheckpointNotFoundError as exc:
            raise CheckpointNotFoundError(
                errno.ENOENT, f"No checkpoint at {target!r}: {exc}"
            ) from exc
        return _load_from(target, io.BytesIO(data), data[:4])
    if not target.exists():
        raise CheckpointNotFoundError(errno.ENOENT, f"No checkpoint at {str(target)!r}.")
    if target.is_dir():
        raise CheckpointError(errno.EISDIR, f"{str(target)!r} is a directory, not a checkpoint.")
    if not target.is_file():  # a named pipe or a device would block the read or never end
        raise CheckpointError(
            errno.EINVAL,
            f"{str(target)!r} is not a regular file (a named pipe, socket or device?), not a "
            "checkpoint: pass the path of a saved file.",
        )
    return _load_from(target, target, None)


def _load_from(target: Path | str, source: Path | IO[bytes], head: bytes | None) -> dict[str, Any]:
    """Load from a local file or a buffer (a URL's bytes); ``target`` names it in errors."""
    if is_safetensors(target):
        from safetensors.torch import load, load_file

        try:
            if isinstance(source, Path):
                return {"format": "safetensors", "model": load_file(str(source))}
            return {"format": "safetensors", "model": load(source.read())}
        except Exception as exc:
            raise CheckpointError(
                errno.EIO, f"{str(target)!r} is not a readable safetensors file ({exc})."
            ) from exc
    try:
        with warnings.catch_warnings():  # torch's own advice to pass weights_only=False
            warnings.simplefilter("ignore")
            obj = torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        forbidden = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if forbidden is None:
            raise _not_a_checkpoint(target, exc, head) from exc
        raise CheckpointError(
            errno.EPERM,
            f"Refusing to load {str(target)!r}: it holds a Python object "
            f"({forbidden.group(1)}) other than tensors and plain values, and unpickling it could "
            "run code, so torch.load(weights_only=True) refused it. Only load files you trust; "
            "save state with torcheras or torch.save(model.state_dict()).",
        ) from exc
    except Exception as exc:  # truncated zips, text files, random bytes...
        raise _not_a_checkpoint(target, exc, head) from exc
    if not isinstance(obj, dict):
        raise CheckpointError(errno.EINVAL, f"{str(target)!r} does not hold a dict of state.")
    version = obj.get("version") if obj.get("format") == FORMAT else None
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise CheckpointError(
            errno.EINVAL,
            f"{str(target)!r} was written by a newer torcheras (file format {version}; this "
            f"one reads formats up to {FORMAT_VERSION}): upgrade torcheras to read it. The "
            "file is left as it is.",
        )
    return obj


def _not_a_checkpoint(
    target: Path | str, exc: BaseException, head: bytes | None = None
) -> CheckpointError:
    if head is None:
        head = b""
        with contextlib.suppress(OSError), open(target, "rb") as handle:
            head = handle.read(4)
    if head:
        legacy_torch = head == b"\x80\x02\x8a\x0a"  # torch's pre-zip format: its magic number
        if (
            len(head) >= 2
            and head[0] == 0x80
            and head[1] <= pickle.HIGHEST_PROTOCOL
            and not (legacy_torch)
        ):
            return CheckpointError(
                errno.EINVAL,
                f"{str(target)!r} is a plain Python pickle (protocol {head[1]}), not a torch "
                "checkpoint: torcheras reads files with torch.load(weights_only=True), which "
                "refuses raw pickles, since unpickling one can run code. Save state with "
                "torch.save(...) or torcheras; a pickle you trust can be read with pickle.load "
                "and saved again with torch.save.",
            )
    detail = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
    return CheckpointError(
        errno.EIO,
        f"{str(target)!r} is not a torcheras/torch checkpoint or corrupt (truncated or "
        f"damaged): {detail[:200]}",
    )


def state_dict_of(checkpoint: Mapping[str, Any]) -> Mapping[str, torch.Tensor]:
    """The model weights inside any file we read: ours, safetensors, or a bare state_dict."""
    if checkpoint.get("format") in (FORMAT, "safetensors") and "model" in checkpoint:
        return checkpoint["model"]
    return checkpoint  # a plain torch.save(model.state_dict())


def load_weights_into(
    module: torch.nn.Module, path: str | os.PathLike[str], strict: bool = True
) -> dict[str, Any]:
    """Load weights from ``path`` into ``module``; accepts keys with or without ``module.``."""
    checkpoint = load(path)
    weights = dict(state_dict_of(checkpoint))
    own = module.state_dict()
    if own and weights and not (own.keys() & weights.keys()):
        prefixed = {f"module.{k}": v for k, v in weights.items()}
        stripped = {k.removeprefix("module."): v for k, v in weights.items()}
        for candidate in (prefixed, stripped):
            if own.keys() & candidate.keys():
                weights = candidate
                break
    try:
        module.load_state_dict(weights, strict=strict)
    except (RuntimeError, TypeError, AttributeError, KeyError) as exc:
        raise ValueError(f"The weights in {str(path)!r} do not fit this model: {exc}") from exc
    return checkpoint


def describe(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What a file holds, as plain data (``torcheras inspect`` and the HTML report): its
    format and kind, the weights' size, the epoch and logs, every optimizer (of a saved
    model, a full ModelCheckpoint file or a backup) and each callback's state in a backup."""
    state = load(path)
    weights = state_dict_of(state)
    info: dict[str, Any] = {
        "path": str(path),
        "format": "safetensors"
        if is_safetensors(path)
        else state.get("format", "torch state_dict"),
        "kind": state.get("kind", "weights"),
        "size_bytes": _size(path),
        "tensors": len(weights),
        "parameters": int(sum(t.numel() for t in weights.values() if isinstance(t, torch.Tensor))),
    }
    for key in ("version", "epoch", "batch", "global_step", "optimizer_steps"):
        if key in state:
            info[key] = state[key]
    if "logs" in state:  # a training state holds the logs of the last finished epoch
        info["last_epoch_logs" if info["kind"] == "training_state" else "logs"] = state["logs"]
    if "created" in state:
        import datetime

        info["created"] = datetime.datetime.fromtimestamp(state["created"]).isoformat(
            " ", "seconds"
        )
    optimizers = dict(state.get("optimizers") or {})
    if "optimizer" in state:  # format 1's full ModelCheckpoint file: one optimizer
        optimizers.setdefault("optimizer", state["optimizer"])
    classes = state.get("optimizer_classes") or {}
    if optimizers:
        info["optimizers"] = {
            name: {
                **({"class": classes[name]} if name in classes else {}),
                "param_groups": len(opt.get("param_groups", [])),
                "lr": [_plain(g.get("lr")) for g in opt.get("param_groups", [])],
                "steps": _steps_of(opt),
            }
            for name, opt in optimizers.items()
        }
    for key in ("scaler", "ema"):
        if key in state:
            info[key] = _summarize(state[key])
    if "callbacks" in state:
        info["callbacks"] = {k: _summarize(v) for k, v in state["callbacks"].items()}
    if "history" in state:
        info["history"] = state["history"]
    return info


def _size(path: str | os.PathLike[str]) -> int:
    where = location(path)
    if isinstance(where, Path):
        return os.path.getsize(where)
    fs, inner = _filesystem(where)
    return int(fs.size(inner))


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, torch.Tensor) and value.numel() == 1 else value


def _steps_of(optimizer_state: Mapping[str, Any]) -> int | None:
    """The updates an optimizer has applied, from its per-parameter ``step`` (Adam & co.)."""
    for param_state in (optimizer_state.get("state") or {}).values():
        if isinstance(param_state, Mapping) and "step" in param_state:
            return int(_plain(param_state["step"]))
    return None


def _summarize(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return f"tensor{list(value.shape)}"
    if isinstance(value, dict):
        if value and all(isinstance(v, torch.Tensor) for v in value.values()):
            return f"<{len(value)} tensors>"
        return {k: _summarize(v) for k, v in value.items()}
    if (
        isinstance(value, (list, tuple))
        and value
        and all(isinstance(v, torch.Tensor) for v in value)
    ):
        return f"<{len(value)} tensors>"
    if isinstance(value, (list, tuple)) and len(value) > 8:
        return f"<list of {len(value)}>"
    return value


# --- sharded folders (torch.distributed.checkpoint) ----------------------------------------------
# A sharded backup is a folder: every rank writes its own shard of the tensors with DCP (which
# can load them on any number of processes: it reshards), and rank 0 adds ``torcheras.pt``, the
# rest of the state. Written under a temp name and renamed to its final one by rank 0 once
# every rank's shard has landed, so a folder under its final name is always complete.
SHARDED_PREFIX = "sharded-"
SHARDED_META = "torcheras.pt"
_SHARDED_NAME = re.compile(r"sharded-e(\d+)-b(\d+)$")


def sharded_name(epoch: int, batch: int) -> str:
    """The final name of the sharded folder of a backup taken at ``(epoch, batch)``."""
    return f"{SHARDED_PREFIX}e{epoch:06d}-b{batch:09d}"


def local_only(path: Path | str, what: str) -> Path:
    """``path`` as a local folder; a URL is refused, naming ``what`` and the fix."""
    if isinstance(path, str):
        raise ValueError(
            f"{what}: {path!r} is a URL, but sharded (DCP) checkpoints are written to a local "
            "or shared filesystem folder, each rank its own file. Pass a folder path (a mount "
            "every node sees), or use the single-file format (sharded=False)."
        )
    return path


def sharded_folders(folder: Path | str) -> list[Path]:
    """The complete sharded folders in ``folder``, newest (latest position) first."""
    if isinstance(folder, str) or not folder.is_dir():
        return []
    found = []
    for child in folder.iterdir():
        match = _SHARDED_NAME.match(child.name)
        if match and child.is_dir():
            found.append(((int(match.group(1)), int(match.group(2))), child))
    return [path for _, path in sorted(found, reverse=True)]


@contextlib.contextmanager
def _quiet_dcp() -> Iterator[None]:
    """DCP warns that it assumes a single process when no group runs: that is the intent.
    Filtered for good (its background save warns on another thread, after this returns)."""
    warnings.filterwarnings(
        "ignore", message=r".*uninitialized, assuming the intent is to (save|load) in a single"
    )
    yield


def save_sharded(
    tensors: Mapping[str, Any],
    meta: Mapping[str, Any],
    folder: Path,
    name: str,
    *,
    keep: int | None = 1,
    group: Any = None,
) -> Path:
    """Write a sharded folder ``folder/name`` in the background; every rank calls it at the
    same point. ``tensors``: a state dict for ``torch.distributed.checkpoint`` (what each rank
    holds: DTensor shards, or whole tensors that DCP writes once); ``meta``: the rest, written
    by rank 0 (its tensors already copied). DCP copies the tensors now (``async_save``); the
    ranks write while training goes on; rank 0 then renames the folder to its final name and
    removes the older backups beyond ``keep`` (None: none). A folder already there under
    that name is replaced (two renames: a kill between them leaves it under a temp name).
    Returns the final path."""
    from torch.distributed.checkpoint import FileSystemWriter, async_save

    wait_for_writes()  # one DCP save at a time: its collectives run on ``group``
    token = distributed.gather_objects(os.urandom(6).hex())[0]  # one temp name for every rank
    final = folder / name
    temp = folder / f"{TEMP_PREFIX}{name}.{token}"
    with naming_file_errors(temp, "save"):
        temp.mkdir(parents=True, exist_ok=True)
    with _quiet_dcp():
        future = async_save(
            dict(tensors), storage_writer=FileSystemWriter(temp), process_group=group
        )
    state = dict(meta)

    def finish() -> None:
        with _quiet_dcp():
            future.result()  # on rank 0: once every rank's shard and DCP's metadata are written
        if not distributed.is_main():
            return
        atomic_write(temp / SHARDED_META, lambda f: torch.save(state, f))
        replaced = folder / f"{TEMP_PREFIX}{name}.{token}.old"
        if final.exists():  # ModelCheckpoint's same name again, or a backup's same position
            os.rename(final, replaced)
        os.rename(temp, final)
        _fsync_dir(folder)
        _remove_tree(replaced)
        for old in [] if keep is None else sharded_folders(folder)[keep:]:
            _remove_tree(old)
        pattern = f"{TEMP_PREFIX}{name}.*" if keep is None else f"{TEMP_PREFIX}{SHARDED_PREFIX}*"
        for stale in folder.glob(pattern):  # killed saves' leftovers
            with contextlib.suppress(OSError):
                if stale.stat().st_mtime < _PROCESS_START:
                    _remove_tree(stale)

    save_in_background(finish, str(final))
    return final


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def load_sharded(folder: Path, template: dict[str, Any], group: Any = None) -> None:
    """Read a sharded folder's tensors into ``template`` in place (every rank calls it): DCP
    gives each rank its part of every tensor, whatever the number of ranks that wrote it."""
    from torch.distributed.checkpoint import FileSystemReader, load
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with _quiet_dcp():
            load(template, storage_reader=FileSystemReader(folder), process_group=group)
    except (Exception, CheckpointException) as exc:  # DCP's carries every rank's traceback
        lines = [line for line in str(exc).splitlines() if line.strip()]
        detail = lines[-1] if lines else type(exc).__name__
        raise CheckpointError(
            errno.EIO, f"Could not read the sharded checkpoint {str(folder)!r}: {detail}."
        ) from exc


def remove_sharded(folder: Path | str) -> None:
    """Remove every sharded folder in ``folder``, complete or not (rank 0, at a fit's end)."""
    if isinstance(folder, str) or not folder.is_dir():
        return
    for path in sharded_folders(folder):
        _remove_tree(path)
    for stale in folder.glob(f"{TEMP_PREFIX}{SHARDED_PREFIX}*"):
        _remove_tree(stale)
