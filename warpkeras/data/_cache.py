"""Small helpers shared by the data loaders: cache locations, fingerprints, seeds."""

import hashlib
import os
import pathlib
import tempfile

import numpy as np

CACHE_ENV_VAR = "WARPKERAS_CACHE_DIR"
DATA_ENV_VAR = "WARPKERAS_DATA_DIR"


def default_cache_dir():
    """Return the directory where decoded data sets are cached.

    The location is ``$WARPKERAS_CACHE_DIR`` when that variable is set and
    ``~/.cache/warpkeras`` otherwise. The directory is not created here.

    Args:
        None.

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

    Args:
        None.

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


def save_npz(path, **arrays):
    """Write arrays to ``path`` atomically (write to a temporary file, then rename)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=str(path.parent), suffix=".npz.tmp")
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
