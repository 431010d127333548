"""Small helpers shared by the data loaders: cache locations, fingerprints, seeds,
argument checks, unreadable-file reporting and cache files that repair themselves."""

import hashlib
import numbers
import os
import pathlib
import re
import socket
import tempfile
import time
import warnings

import numpy as np

CACHE_ENV_VAR = "WARPKERAS_CACHE_DIR"
DATA_ENV_VAR = "WARPKERAS_DATA_DIR"


def default_cache_dir():
    """Return the directory where decoded data sets are cached.

    The location is ``$WARPKERAS_CACHE_DIR`` when that variable is set and
    ``~/.cache/warpkeras`` otherwise. The directory is not created here.

    Returns:
        A ``pathlib.Path``.

    Example:
        >>> from warpkeras.data import default_cache_dir
        >>> path = default_cache_dir()   # e.g. PosixPath('/home/me/.cache/warpkeras')
    """
    env = os.environ.get(CACHE_ENV_VAR)
    if env:
        return pathlib.Path(env).expanduser()
    return pathlib.Path("~/.cache/warpkeras").expanduser()


def default_data_dir():
    """Return the directory where raw data sets are looked for by default.

    The location is ``$WARPKERAS_DATA_DIR`` when that variable is set and
    ``~/.cache/warpkeras/data`` otherwise.

    Returns:
        A ``pathlib.Path``.

    Example:
        >>> from warpkeras.data import default_data_dir
        >>> omniglot_dir = default_data_dir() / "omniglot"
    """
    env = os.environ.get(DATA_ENV_VAR)
    if env:
        return pathlib.Path(env).expanduser()
    return default_cache_dir() / "data"


def resolve_cache_dir(cache_dir):
    """Turn a user-supplied cache directory (or None) into a Path."""
    if cache_dir is None:
        return default_cache_dir()
    return pathlib.Path(cache_dir).expanduser()


def fingerprint(items):
    """A short, stable hex digest of a sequence of printable items."""
    digest = hashlib.sha1()
    for item in items:
        digest.update(repr(item).encode("utf-8"))
        digest.update(b"\x00")
    return digest.hexdigest()[:16]


def file_signature(path, root=None):
    """What identifies a file's content for a cache key: ``(name, size, mtime_ns, ctime_ns)``.

    A file replaced or rewritten in place changes its size or modification time (and its
    status-change time), so a cache keyed by signatures is rebuilt when any input changes.

    Args:
        path: the file.
        root: when given, the name is the path relative to ``root`` (else the base name).

    Returns:
        A tuple ``(str, int, int, int)``.
    """
    stat = os.stat(path)
    name = os.path.relpath(path, root) if root is not None else os.path.basename(path)
    return (name, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)


_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<host>[^.]+)-(?P<pid>\d+)-[^.]+\.tmp$")
_LEGACY_TEMP_RE = re.compile(r"^tmp[^.]+\.npz\.tmp$")
_LEGACY_TEMP_AGE = 3600.0  # seconds; a cache write takes seconds


def _host():
    return socket.gethostname().replace(".", "_").replace("-", "_")


def remove_stale_temporaries(folder):
    """Removes the temporary files that a process killed while writing a cache file left
    in `folder`: ``.<name>.<host>-<pid>-*.tmp`` of this host whose process has ended, and
    unnamed ``tmp*.npz.tmp`` files (written before temporaries named their process) older
    than an hour. Files of running processes and of other hosts are kept.

    Args:
        folder: a cache folder (it need not exist).

    Returns:
        The removed paths (a list of str).
    """
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    host, now = _host(), time.time()
    for name in names:
        path = os.path.join(folder, name)
        m = _TEMP_RE.match(name)
        if m:
            pid = int(m.group("pid"))
            if m.group("host") != host or pid == os.getpid():
                continue
            try:
                os.kill(pid, 0)
                continue  # still running
            except ProcessLookupError:
                pass
            except (PermissionError, OverflowError, OSError):
                continue  # cannot tell: keep
        elif _LEGACY_TEMP_RE.match(name):
            try:
                if now - os.path.getmtime(path) < _LEGACY_TEMP_AGE:
                    continue
            except OSError:
                continue
        else:
            continue
        try:
            os.remove(path)
            removed.append(path)
        except OSError:
            pass
    return removed


def save_npz(path, **arrays):
    """Write arrays to ``path`` atomically (write to a temporary file, then rename).

    The temporary file ``.<name>.<host>-<pid>-*.tmp`` names its process, so that the
    leftovers of a process killed while writing are removed by the next write
    (`remove_stale_temporaries`)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(str(path.parent))
    fd, tmp = tempfile.mkstemp(
        dir=str(path.parent), suffix=".tmp", prefix=f".{path.name}.{_host()}-{os.getpid()}-"
    )
    try:
        with os.fdopen(fd, "wb") as handle:
            np.savez_compressed(handle, **arrays)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def as_generator(rng):
    """Accept a numpy Generator, an int seed, a SeedSequence or None; return a Generator."""
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(rng)


def seed_pair(seed, count=2):
    """Derive ``count`` int64 keys from an integer seed (or fresh entropy when None)."""
    if seed is not None and not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
    if seed is not None and seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    state = np.random.SeedSequence(seed).generate_state(count, dtype=np.uint32)
    return [int(value) for value in state]


def read_cache(path, reader, what="cache file"):
    """Read a cache file with ``reader(path)``; on any failure warn, delete it and return None.

    A truncated, zero-byte or otherwise damaged cache file (``BadZipFile``, ``EOFError``,
    zlib errors, missing keys, ...) must never fail every later run: the caller rebuilds
    the cache when this returns None.

    Args:
        path: the cache file (it need not exist).
        reader: callable reading the file completely and returning its value.
        what: how the warning names the file.

    Returns:
        ``reader(path)``, or None when the file is missing or unreadable.
    """
    path = pathlib.Path(path)
    remove_stale_temporaries(str(path.parent))
    if not path.exists():
        return None
    try:
        return reader(path)
    except Exception as err:  # noqa: BLE001 - a damaged file can fail in many ways
        warnings.warn(
            f"{what} {path} is unreadable ({type(err).__name__}: {err}); rebuilding it",
            stacklevel=3,
        )
        try:
            path.unlink()
        except OSError:
            pass
        return None


def write_cache(path, arrays, what="cache file"):
    """Write a cache file atomically; if that fails (read-only disk, full disk) warn and go on.

    Args:
        path: the cache file.
        arrays: dict of arrays for :func:`save_npz`.
        what: how the warning names the file.

    Returns:
        True when the file was written.
    """
    try:
        save_npz(path, **arrays)
        return True
    except OSError as err:
        warnings.warn(
            f"could not write the {what} {path} ({type(err).__name__}: {err}); continuing "
            "without caching (pass cache_dir=<writable folder> or use_cache=False)",
            stacklevel=3,
        )
        return False


class CorruptFileError(OSError, ValueError):
    """A data file (or a member of an archive) that cannot be read or decoded.

    The message names the file (and the archive member) and says how to go on: replace
    or remove the file, or pass ``skip_corrupt=True`` to the loader to skip unreadable
    files with a warning.

    Args:
        path: the file or archive that failed.
        member: the archive member that failed, or None.
        reason: the underlying error (an exception or a string).

    Attributes:
        path: as given (a ``str``).
        member: as given.
        reason: a one-line description of the underlying error.
    """

    def __init__(self, path, member=None, reason=""):
        self.path = str(path)
        self.member = member
        if isinstance(reason, BaseException):
            reason = f"{type(reason).__name__}: {reason}"
        self.reason = str(reason)
        super().__init__(
            f"cannot read {self.where}: {self.reason}. The file is damaged, truncated or not "
            "of the expected format; replace it (e.g. download the data set again), remove "
            "it, or pass skip_corrupt=True to skip unreadable files with a warning"
        )

    @property
    def where(self):
        """``"member 'm' of archive 'a'"`` or ``"file 'f'"``."""
        if self.member is None:
            return f"file '{self.path}'"
        return f"member '{self.member}' of archive '{self.path}'"

    def __reduce__(self):
        return (type(self), (self.path, self.member, self.reason))


def report_corrupt(error, skip_corrupt, skipped):
    """Raise ``error`` (a :class:`CorruptFileError`), or warn and record it when skipping.

    Args:
        error: the :class:`CorruptFileError`.
        skip_corrupt: when False, raise it.
        skipped: a list that receives ``error.where`` when skipping.
    """
    if not skip_corrupt:
        raise error
    skipped.append(error.where)
    warnings.warn(f"skipping unreadable {error.where}: {error.reason}", stacklevel=3)


# ----------------------------------------------------------------------------------------
# argument checks


def check_int(name, value, minimum=None, allow_none=False, hint=""):
    """Return ``value`` as an ``int``, or raise naming the argument and the fix.

    Integers (Python or numpy) and integral floats are accepted; ``bool``, strings,
    non-integral or non-finite floats and values below ``minimum`` are refused.

    Args:
        name: the argument's name, for the message.
        value: the value given.
        minimum: the smallest allowed value, or None.
        allow_none: accept (and return) None.
        hint: extra text appended to the message (e.g. what the argument means).

    Returns:
        An ``int`` (or None).

    Raises:
        TypeError: not an integer.
        ValueError: an integer below ``minimum`` or a non-integral float.
    """
    if value is None and allow_none:
        return None
    bound = "" if minimum is None else f" >= {minimum}"
    kind = "an integer" + bound + (" or None" if allow_none else "")
    tail = f" ({hint})" if hint else ""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{name} must be {kind}, got {value!r} ({type(value).__name__}); pass e.g. "
            f"{name}={minimum if minimum is not None else 0}{tail}"
        )
    if not isinstance(value, numbers.Integral):
        if not np.isfinite(value) or float(value) != int(value):
            raise ValueError(f"{name} must be {kind}, got {value!r}{tail}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be {kind}, got {value}{tail}")
    return value


def check_bool(name, value):
    """Return ``value`` if it is a ``bool`` (or numpy bool), else raise naming the argument.

    Args:
        name: the argument's name.
        value: the value given.

    Returns:
        A ``bool``.

    Raises:
        TypeError: anything else (e.g. the string ``"no"``, which would be true).
    """
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")


def check_dir(name, value, allow_none=True, must_exist=False):
    """Check a folder argument: a ``str`` or path-like naming a folder (or nothing yet).

    Args:
        name: the argument's name.
        value: the value given.
        allow_none: accept None (returned as None).
        must_exist: refuse a path that does not exist.

    Returns:
        A ``pathlib.Path`` (user-expanded) or None.

    Raises:
        TypeError: not a ``str``/path-like.
        ValueError: an empty string.
        NotADirectoryError: the path exists and is a file.
        FileNotFoundError: ``must_exist`` and the path does not exist.
    """
    if value is None and allow_none:
        return None
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(
            f"{name} must be a folder path (str or pathlib.Path)"
            + (" or None" if allow_none else "")
            + f", got {value!r} ({type(value).__name__})"
        )
    if isinstance(value, str) and not value.strip():
        raise ValueError(f"{name} must name a folder, got an empty string")
    path = pathlib.Path(value).expanduser()
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(
            f"{name}={str(path)!r} is a file, not a folder; pass a folder (e.g. the one that "
            "holds it)"
        )
    if must_exist and not path.exists():
        raise FileNotFoundError(f"{name}={str(path)!r} does not exist; pass an existing folder")
    return path


def check_float(name, value, hint=""):
    """Return ``value`` as a finite ``float``, or raise naming the argument.

    Args:
        name: the argument's name.
        value: the value given (any real number; not ``bool`` or a string).
        hint: extra text appended to the message.

    Returns:
        A ``float``.

    Raises:
        TypeError: not a real number.
        ValueError: NaN or infinite.
    """
    tail = f" ({hint})" if hint else ""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{name} must be a finite number, got {value!r} ({type(value).__name__}){tail}"
        )
    value = float(value)
    if not np.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}{tail}")
    return value
