"""Omniglot for the multi-shot protocol: each alphabet is a 20-way classification task.

Images are greyscale ``float32`` in ``[0, 1]``, resized to 28x28 with area
averaging. By default they are *inverted* so that pen strokes are 1 and the
background is 0 (the raw PNGs are black strokes on white); pass
``invert=False`` to keep the original polarity (then the augmentation fills
with 1, the background).

Sources (see :func:`load_omniglot`): a local copy in the dataset's own layout
(the published zips ``images_background.zip`` / ``images_evaluation.zip`` or
their extracted folders ``<root>/<alphabet>/<character>/<id>_<drawer>.png``),
or TensorFlow Datasets' ``omniglot``. Decoded images are cached as ``.npz``.
"""

import functools
import io
import logging
import os
import pathlib
import socket
import threading
import warnings
import zipfile
import zlib

import numpy as np

from warpkeras.data._cache import (
    CorruptFileError,
    as_generator,
    check_bool,
    check_dir,
    check_int,
    default_data_dir,
    file_signature,
    fingerprint,
    read_cache,
    report_corrupt,
    resolve_cache_dir,
    write_cache,
)
from warpkeras.data.augment import random_affine
from warpkeras.data.tasks import ClassificationTask

OMNIGLOT_DIR_ENV_VAR = "WARPKERAS_OMNIGLOT_DIR"
OMNIGLOT_URL = "https://github.com/brendenlake/omniglot/tree/master/python"
_CACHE_VERSION = 2
_SOURCES = ("auto", "local", "tfds")
# Where TensorFlow Datasets downloads Omniglot from, probed (briefly) before a download.
_DOWNLOAD_HOST = ("github.com", 443)
_PROBE_TIMEOUT_S = 3.0
# Raw Omniglot PNGs are black strokes (0) on a white background (255).
_RAW_BACKGROUND = 255
# What reading or decoding a damaged file can raise (PIL's errors are OSError/ValueError).
_READ_ERRORS = (
    OSError,
    ValueError,
    EOFError,
    SyntaxError,
    zlib.error,
    zipfile.BadZipFile,
    NotImplementedError,
    RuntimeError,
    IndexError,
)
_logger = logging.getLogger(__name__)


class OmniglotNotFoundError(FileNotFoundError):
    """Raised when no Omniglot source can be found; the message says what to download and where.

    Example:
        >>> try:
        ...     load_omniglot(source="local", data_dir="/nonexistent")
        ... except OmniglotNotFoundError as err:
        ...     print("images_background.zip" in str(err))
        True
    """


def default_omniglot_dir():
    """Directory searched for a local Omniglot copy when none is given.

    ``$WARPKERAS_OMNIGLOT_DIR`` if set, else ``<default_data_dir()>/omniglot``.

    Returns:
        A ``pathlib.Path`` (it may not exist).

    Example:
        >>> from warpkeras.data import default_omniglot_dir
        >>> path = default_omniglot_dir()
    """
    env = os.environ.get(OMNIGLOT_DIR_ENV_VAR)
    if env:
        return pathlib.Path(env).expanduser()
    return default_data_dir() / "omniglot"


class OmniglotData:
    """All decoded Omniglot drawings plus their alphabet / character / drawer ids.

    Drawings are sorted by alphabet name, character name, drawer id and file name,
    so the order does not depend on how the source was listed.

    Args:
        images: uint8 array ``(N, H, W)``; 255 is a pen stroke when ``inverted``.
        alphabet_ids: int array ``(N,)`` indexing ``alphabet_names``.
        character_ids: int array ``(N,)`` indexing ``character_names``.
        drawer_ids: int array ``(N,)``, the drawer number from the file name
            (``<id>_<drawer>.png``), or -1 when unknown (TensorFlow Datasets source).
        alphabet_names: list of alphabet names.
        character_names: list of ``"<alphabet>/<character>"`` names.
        inverted: whether strokes are bright (1) on a dark (0) background.
        source: a description of where the data came from.
        skipped: descriptions of unreadable files left out (``skip_corrupt=True``).

    Attributes:
        character_alphabet: int array giving the alphabet id of each character.

    Example:
        >>> data = load_omniglot(data_dir="../shared/data/omniglot")   # doctest: +SKIP
        >>> data.alphabet_names[:2], data.images.shape                   # doctest: +SKIP
        (['Balinese', 'Early_Aramaic'], (4840, 28, 28))
    """

    def __init__(
        self,
        images,
        alphabet_ids,
        character_ids,
        drawer_ids,
        alphabet_names,
        character_names,
        inverted=True,
        source="",
        skipped=(),
    ):
        self.images = np.asarray(images, dtype=np.uint8)
        self.alphabet_ids = np.asarray(alphabet_ids, dtype=np.int32)
        self.character_ids = np.asarray(character_ids, dtype=np.int32)
        self.drawer_ids = np.asarray(drawer_ids, dtype=np.int32)
        self.alphabet_names = [str(n) for n in alphabet_names]
        self.character_names = [str(n) for n in character_names]
        self.inverted = bool(inverted)
        self.source = str(source)
        self.skipped = [str(s) for s in skipped]
        n = len(self.images)
        if self.images.ndim != 3:
            raise ValueError(f"images must have shape (N, H, W), got {self.images.shape}")
        for name, arr in (
            ("alphabet_ids", self.alphabet_ids),
            ("character_ids", self.character_ids),
            ("drawer_ids", self.drawer_ids),
        ):
            if arr.shape != (n,):
                raise ValueError(f"{name} must have shape ({n},), got {arr.shape}")
        self.character_alphabet = np.full(len(self.character_names), -1, dtype=np.int32)
        self.character_alphabet[self.character_ids] = self.alphabet_ids
        self._by_character = None

    @property
    def image_size(self):
        """Side length of the (square) images."""
        return int(self.images.shape[1])

    @property
    def background(self):
        """Background intensity in ``[0, 1]`` (0 when inverted, else 1)."""
        return 0.0 if self.inverted else 1.0

    def characters_of(self, alphabet):
        """Character ids of an alphabet, in name order.

        Args:
            alphabet: alphabet name (str) or id (int).

        Returns:
            int array of character ids.

        Example:
            >>> data.characters_of("Greek")[:3]   # doctest: +SKIP
            array([48, 49, 50], dtype=int32)
        """
        if isinstance(alphabet, str):
            if alphabet not in self.alphabet_names:
                raise KeyError(f"unknown alphabet {alphabet!r}; known: {self.alphabet_names}")
            alphabet = self.alphabet_names.index(alphabet)
        return np.flatnonzero(self.character_alphabet == int(alphabet)).astype(np.int32)

    def drawings_of(self, character):
        """Indices (into ``images``) of a character's drawings, in drawer order.

        Args:
            character: character id (int) or ``"<alphabet>/<character>"`` name.

        Returns:
            int array of row indices.

        Example:
            >>> rows = data.drawings_of("Greek/character01")   # doctest: +SKIP
        """
        if isinstance(character, str):
            if character not in self.character_names:
                raise KeyError(f"unknown character {character!r}")
            character = self.character_names.index(character)
        if self._by_character is None:
            order = np.argsort(self.character_ids, kind="stable")
            bounds = np.searchsorted(
                self.character_ids[order], np.arange(len(self.character_names) + 1)
            )
            self._by_character = [
                order[bounds[i] : bounds[i + 1]] for i in range(len(self.character_names))
            ]
        return self._by_character[int(character)]

    def usable_alphabets(self, min_characters=20):
        """Names of alphabets with at least ``min_characters`` characters.

        Args:
            min_characters: the minimum number of characters (20 in the protocol).

        Returns:
            list of alphabet names (sorted).

        Example:
            >>> data.usable_alphabets(20)   # doctest: +SKIP
        """
        return [a for a in self.alphabet_names if len(self.characters_of(a)) >= min_characters]

    def character_arrays(self, alphabets=None):
        """All drawings of the given alphabets as image/label arrays (e.g. for few-shot episodes).

        Args:
            alphabets: iterable of alphabet names; ``None`` means all.

        Returns:
            ``(x, y, names)``: float32 images ``(N, H, W, 1)`` in ``[0, 1]``, int32
            character ids ``(N,)`` (global ids, see ``character_names``), and the list
            of character names.

        Example:
            >>> x, y, names = data.character_arrays(["Greek", "Latin"])   # doctest: +SKIP
        """
        if alphabets is None:
            mask = np.ones(len(self.images), dtype=bool)
        else:
            ids = []
            for name in alphabets:
                if name not in self.alphabet_names:
                    raise KeyError(f"unknown alphabet {name!r}; known: {self.alphabet_names}")
                ids.append(self.alphabet_names.index(name))
            mask = np.isin(self.alphabet_ids, ids)
        x = self.images[mask].astype(np.float32)[..., None] / 255.0
        return x, self.character_ids[mask].copy(), list(self.character_names)

    def _to_arrays(self):
        return dict(
            version=np.int64(_CACHE_VERSION),
            images=self.images,
            alphabet_ids=self.alphabet_ids,
            character_ids=self.character_ids,
            drawer_ids=self.drawer_ids,
            alphabet_names=np.array(self.alphabet_names, dtype=str),
            character_names=np.array(self.character_names, dtype=str),
            inverted=np.bool_(self.inverted),
            source=np.array(self.source, dtype=str),
            skipped=np.array(self.skipped, dtype=str).reshape(-1),
        )

    @classmethod
    def _from_npz(cls, path):
        with np.load(path, allow_pickle=False) as f:
            if int(f["version"]) != _CACHE_VERSION:
                raise ValueError("stale cache version")
            return cls(
                images=f["images"],
                alphabet_ids=f["alphabet_ids"],
                character_ids=f["character_ids"],
                drawer_ids=f["drawer_ids"],
                alphabet_names=f["alphabet_names"].tolist(),
                character_names=f["character_names"].tolist(),
                inverted=bool(f["inverted"]),
                source=str(f["source"]),
                skipped=f["skipped"].tolist(),
            )

    def __repr__(self):
        return (
            f"OmniglotData({len(self.alphabet_names)} alphabets, {len(self.character_names)} "
            f"characters, {len(self.images)} drawings, {self.image_size}x{self.image_size}, "
            f"inverted={self.inverted})"
        )


# ----------------------------------------------------------------------------------------
# decoding


def _resize_grey(image, image_size):
    """Resize a 2-D uint8/float array (0..255) with area averaging; returns float32 0..255."""
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow comes with warpkeras[data]
        Image = None
    if Image is not None:
        pil = Image.fromarray(np.ascontiguousarray(image, dtype=np.float32))
        if pil.size != (image_size, image_size):
            pil = pil.resize((image_size, image_size), Image.BOX)
        return np.asarray(pil, dtype=np.float32)
    import tensorflow as tf  # pragma: no cover

    arr = tf.convert_to_tensor(np.asarray(image, np.float32)[..., None])  # pragma: no cover
    return tf.image.resize(arr, [image_size, image_size], method="area").numpy()[..., 0]


def _decode_png(data, image_size):
    """Decode PNG bytes to a greyscale float32 (0..255) image of side ``image_size``.

    Transparent pixels (an alpha channel, or a ``transparency`` colour) are composited
    over Omniglot's white background (255) first, so a drawing saved with a transparent
    background decodes as strokes on white rather than as solid ink. Raises the decoder's
    own error (``OSError``, ``ValueError``, ...) for damaged data.
    """
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover
        Image = None
    if Image is not None:
        from PIL import UnidentifiedImageError

        try:
            img = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            raise ValueError(
                f"not an image that Pillow can identify ({len(data)} bytes, starting {data[:8]!r})"
            ) from None
        with img:
            img.load()  # decode now: a truncated file fails here, not later
            if "A" in img.getbands() or "transparency" in img.info:
                rgba = img.convert("RGBA")
                background = Image.new("RGBA", rgba.size, (_RAW_BACKGROUND,) * 3 + (255,))
                img = Image.alpha_composite(background, rgba)
            grey = np.asarray(img.convert("L"), dtype=np.float32)
    else:  # pragma: no cover
        import tensorflow as tf

        rgba = tf.io.decode_png(data, channels=4).numpy().astype(np.float32)
        luma = rgba[..., :3] @ np.array([0.299, 0.587, 0.114], np.float32)
        alpha = rgba[..., 3] / 255.0
        grey = luma * alpha + _RAW_BACKGROUND * (1.0 - alpha)
    return _resize_grey(grey, image_size)


def _finish(raw, invert):
    values = 255.0 - raw if invert else raw
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def _parse_drawer(filename):
    stem = filename.rsplit(".", 1)[0]
    try:
        return int(stem.rsplit("_", 1)[-1])
    except ValueError:
        return -1


def _assemble(records, invert, source):
    """records: list of (alphabet, character, drawer, tiebreak, raw float image)."""
    records.sort(key=lambda r: (r[0], r[1], r[2], r[3]))
    alphabet_names = sorted({r[0] for r in records})
    alphabet_index = {name: i for i, name in enumerate(alphabet_names)}
    character_names = sorted({f"{r[0]}/{r[1]}" for r in records})
    character_index = {name: i for i, name in enumerate(character_names)}
    images = np.stack([_finish(r[4], invert) for r in records])
    return OmniglotData(
        images=images,
        alphabet_ids=[alphabet_index[r[0]] for r in records],
        character_ids=[character_index[f"{r[0]}/{r[1]}"] for r in records],
        drawer_ids=[r[2] for r in records],
        alphabet_names=alphabet_names,
        character_names=character_names,
        inverted=invert,
        source=source,
    )


# ----------------------------------------------------------------------------------------
# local source


def _split_member(path):
    """Return (alphabet, character, filename) for a '.../<alphabet>/<character>/<file>.png'."""
    parts = [p for p in path.replace("\\", "/").split("/") if p]
    if len(parts) < 3 or not parts[-1].lower().endswith(".png"):
        return None
    if parts[-1].startswith("._") or "__MACOSX" in parts:
        return None
    return parts[-3], parts[-2], parts[-1]


def _scan_local(root):
    """List the Omniglot sources under ``root``.

    Returns ``(zips, pngs)``: zip files named ``images_*.zip`` directly in root, and
    PNG files found below root (``(path, (alphabet, character, filename))``).
    """
    root = pathlib.Path(root).expanduser()
    if not root.is_dir():
        return [], []
    zips = sorted(p for p in root.glob("images_*.zip") if p.is_file())
    pngs = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for filename in sorted(filenames):
            if filename.lower().endswith(".png"):
                full = os.path.join(dirpath, filename)
                key = _split_member(os.path.relpath(full, root))
                if key is not None:
                    pngs.append((full, key))
    return zips, pngs


def _local_fingerprint(root, zips, pngs):
    """Cache key items of a local copy: every zip's and PNG's name, size and times.

    Keyed by content (size, modification and status-change times of each file), not by
    names alone, so a PNG or zip replaced in place is decoded again.
    """
    items = [str(pathlib.Path(root).resolve())]
    for z in zips:
        items.append(file_signature(z))
    items.append(len(pngs))
    items.append(fingerprint(file_signature(p, root) for p, _ in pngs))
    return items


def _decode_local(zips, pngs, image_size, invert, source, skip_corrupt=False):
    """Decode a local copy; unreadable files raise :class:`CorruptFileError` naming them
    (or, with ``skip_corrupt``, are skipped with a warning and listed in ``skipped``)."""
    seen = set()
    records = []
    skipped = []
    for full, key in pngs:
        if key in seen:
            continue
        try:
            with open(full, "rb") as handle:
                raw = _decode_png(handle.read(), image_size)
        except _READ_ERRORS as err:
            report_corrupt(CorruptFileError(full, None, err), skip_corrupt, skipped)
            continue
        seen.add(key)
        records.append((key[0], key[1], _parse_drawer(key[2]), key[2], raw))
    for zpath in zips:
        try:
            archive = zipfile.ZipFile(zpath)
        except _READ_ERRORS as err:
            report_corrupt(CorruptFileError(zpath, None, err), skip_corrupt, skipped)
            continue
        with archive:
            for member in archive.namelist():
                key = _split_member(member)
                if key is None or key in seen:
                    continue
                try:
                    raw = _decode_png(archive.read(member), image_size)
                except _READ_ERRORS as err:
                    report_corrupt(CorruptFileError(zpath, member, err), skip_corrupt, skipped)
                    continue
                seen.add(key)
                records.append((key[0], key[1], _parse_drawer(key[2]), key[2], raw))
    if not records:
        raise OmniglotNotFoundError(
            f"no readable Omniglot PNG files found in {source}: expected "
            "<alphabet>/<character>/<id>_<drawer>.png entries"
            + (f" ({len(skipped)} unreadable files skipped)" if skipped else "")
        )
    data = _assemble(records, invert, source)
    data.skipped = skipped
    return data


# ----------------------------------------------------------------------------------------
# TensorFlow Datasets source


class _Offline(Exception):
    """TensorFlow Datasets would have to download Omniglot, but the network is unreachable."""


def _download_route():
    """``(host, port, what)`` a download connects to first: the HTTPS proxy when one is set
    (``https_proxy`` / ``all_proxy``, unless ``no_proxy`` exempts the download host), else
    the download host itself; ``what`` describes it for messages."""
    import urllib.parse
    import urllib.request

    proxies = urllib.request.getproxies()
    proxy = proxies.get("https") or proxies.get("all")
    if proxy and not urllib.request.proxy_bypass(_DOWNLOAD_HOST[0]):
        parsed = urllib.parse.urlsplit(proxy if "://" in proxy else "http://" + proxy)
        defaults = {"https": 443, "http": 80}
        try:
            port = parsed.port or defaults.get(parsed.scheme, 1080)
        except ValueError:  # a malformed port: let the download itself report it
            port = None
        if parsed.hostname and port:
            return parsed.hostname, port, "the proxy the download goes through"
    return (*_DOWNLOAD_HOST, "where it is downloaded from")


def _network_reachable(host, port, timeout):
    """Whether a TCP connection to ``host:port`` opens within ``timeout`` seconds.

    Name resolution does not honour socket timeouts, so the probe runs in a daemon thread
    and is abandoned after ``timeout``.
    """
    result = []

    def probe():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, name="warpkeras-network-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def _decode_tfds(splits, image_size, invert, tfds_data_dir, download):
    import hashlib

    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ImportError(
            "Reading Omniglot through tensorflow-datasets needs the package "
            'tensorflow-datasets: pip install "warpkeras[data]" (or pass a folder of the '
            "original Omniglot files)."
        ) from e

    split = "+".join(splits)
    if download:
        builder = tfds.builder("omniglot", data_dir=tfds_data_dir)
        # Probe only in front of TFDS's own downloader: under tfds.testing.mock_data,
        # download_and_prepare is replaced by a no-op and nothing is downloaded.
        real_download = getattr(type(builder).download_and_prepare, "__module__", "")
        if real_download.startswith("tensorflow_datasets.core") and not builder.is_prepared():
            host, port, what = _download_route()
            if not _network_reachable(host, port, _PROBE_TIMEOUT_S):
                raise _Offline(
                    f"it is not downloaded (looked in {builder.data_dir}) and "
                    f"{host}:{port}, {what}, cannot be reached within "
                    f"{_PROBE_TIMEOUT_S:g} s (offline?)"
                )
            _logger.warning(
                "No Omniglot copy found; downloading 'omniglot' with TensorFlow Datasets "
                "into %s (about 18 MB, once).",
                builder.data_dir,
            )
    ds, info = tfds.load(
        "omniglot",
        split=split,
        data_dir=tfds_data_dir,
        download=download,
        shuffle_files=False,
        with_info=True,
    )
    alphabet_feature = info.features["alphabet"]
    seen = set()
    records = []
    for example in tfds.as_numpy(ds):
        image = example["image"]
        grey = image[..., 0] if image.ndim == 3 else image
        alphabet = alphabet_feature.int2str(int(example["alphabet"]))
        character = f"character{int(example['alphabet_char_id']) + 1:02d}"
        digest = hashlib.sha1(np.ascontiguousarray(grey).tobytes()).hexdigest()
        key = (alphabet, character, digest)
        if key in seen:
            continue
        seen.add(key)
        raw = _resize_grey(grey.astype(np.float32), image_size)
        records.append((alphabet, character, -1, digest, raw))
    if not records:
        raise OmniglotNotFoundError(f"tensorflow_datasets 'omniglot' split {split!r} is empty")
    return _assemble(records, invert, f"tfds:omniglot[{split}]")


# ----------------------------------------------------------------------------------------
# public loader


def _not_found_message(searched, tfds_reason):
    lines = ["No Omniglot data could be found."]
    if searched:
        lines.append("Looked for a local copy in: " + ", ".join(str(p) for p in searched) + ".")
    if tfds_reason:
        lines.append(f"TensorFlow Datasets 'omniglot' was not available: {tfds_reason}")
    lines.append(
        "To fix this, download images_background.zip and images_evaluation.zip from "
        f"{OMNIGLOT_URL} and put them (zipped or extracted, layout "
        "<alphabet>/<character>/<id>_<drawer>.png) in "
        f"{default_omniglot_dir()}, or pass data_dir=<folder>, or set "
        f"${OMNIGLOT_DIR_ENV_VAR}; or, with internet access, use source='tfds' "
        "(tensorflow_datasets downloads 'omniglot' itself)."
    )
    return " ".join(lines)


def load_omniglot(
    source="auto",
    data_dir=None,
    *,
    image_size=28,
    invert=True,
    cache_dir=None,
    use_cache=True,
    download=True,
    tfds_data_dir=None,
    tfds_splits=("train", "test"),
    skip_corrupt=False,
):
    """Load (and cache) all Omniglot drawings as 28x28 greyscale images.

    With ``source="auto"`` a local copy is used when one is found (``data_dir``, then
    ``$WARPKERAS_OMNIGLOT_DIR`` / :func:`default_omniglot_dir`), otherwise TensorFlow
    Datasets' ``omniglot`` (downloaded when ``download`` and online). A local copy is a
    folder holding the published zips (``images_background*.zip``,
    ``images_evaluation*.zip``) and/or extracted folders
    ``.../<alphabet>/<character>/<id>_<drawer>.png``. The same drawing found twice
    (an alphabet in two zips) is kept once. PNGs with a transparent background are
    composited over white (the background of the raw drawings) before decoding.

    Before TensorFlow Datasets downloads anything, the download host is probed for
    ``3`` s: offline, this fails at once (``OmniglotNotFoundError``) instead of after
    minutes of retries; online, a warning is logged that the download starts.

    Decoded images are cached in ``cache_dir`` (default :func:`default_cache_dir`,
    i.e. ``$WARPKERAS_CACHE_DIR`` or ``~/.cache/warpkeras``) as an ``.npz`` keyed by
    the content of the source files (name, size and modification time of every zip
    and PNG), size and polarity, so later loads skip PNG decoding and a file replaced
    in place is decoded again. A damaged cache file is rebuilt, with a warning.

    Args:
        source: ``"auto"``, ``"local"`` or ``"tfds"``.
        data_dir: folder of the local copy (for ``"local"``/``"auto"``), str or path.
        image_size: side of the square output images in pixels, an int >= 1 (28 in the
            protocol).
        invert: make strokes 1 and background 0 (default); ``False`` keeps black on white.
        cache_dir: cache folder; ``None`` uses the default.
        use_cache: read and write the cache.
        download: let TensorFlow Datasets download the data when missing.
        tfds_data_dir: ``data_dir`` passed to ``tfds.load`` (``None``: tfds default).
        tfds_splits: tfds split name or names to combine (``"train"`` = background,
            ``"test"`` = evaluation; ``"small1"``, ``"small2"`` also exist).
        skip_corrupt: skip unreadable files (damaged or truncated PNGs, files that are
            not PNGs, damaged zips or zip members) with a warning naming each, instead of
            raising. The names of skipped files are in ``OmniglotData.skipped``.

    Returns:
        An :class:`OmniglotData`.

    Raises:
        OmniglotNotFoundError: no source found (or offline with nothing downloaded); the
            message says what to download and where.
        CorruptFileError: (a ``ValueError`` and ``OSError``) a file or zip member cannot
            be read; the message names the archive and member (or the file). Not raised
            with ``skip_corrupt=True``.
        TypeError, ValueError, NotADirectoryError: a bad argument; the message names it.

    Example:
        >>> data = load_omniglot(data_dir="../shared/data/omniglot")   # doctest: +SKIP
        >>> data.usable_alphabets(20)                                   # doctest: +SKIP
    """
    if not isinstance(source, str) or source not in _SOURCES:
        raise ValueError(f"source must be one of {_SOURCES}, got {source!r}")
    data_dir = check_dir("data_dir", data_dir)
    image_size = check_int("image_size", image_size, minimum=1, hint="side in pixels, e.g. 28")
    invert = check_bool("invert", invert)
    cache_dir = check_dir("cache_dir", cache_dir)
    use_cache = check_bool("use_cache", use_cache)
    download = check_bool("download", download)
    skip_corrupt = check_bool("skip_corrupt", skip_corrupt)
    tfds_data_dir = check_dir("tfds_data_dir", tfds_data_dir)
    if tfds_data_dir is not None:
        tfds_data_dir = str(tfds_data_dir)
    if isinstance(tfds_splits, str):
        tfds_splits = (tfds_splits,)
    try:
        splits = tuple(tfds_splits)
    except TypeError:
        raise TypeError(
            f"tfds_splits must be a split name or a sequence of them, e.g. ('train', 'test'); "
            f"got {tfds_splits!r}"
        ) from None
    if not splits or not all(isinstance(x, str) and x for x in splits):
        raise ValueError(
            f"tfds_splits must name at least one split, as non-empty strings, e.g. "
            f"('train', 'test'); got {tfds_splits!r}"
        )
    cache_root = resolve_cache_dir(cache_dir) / "omniglot"

    def cached(kind, items, build):
        key = fingerprint([_CACHE_VERSION, kind, image_size, invert, skip_corrupt, *items])
        path = cache_root / f"omniglot_{kind}_{image_size}px_{key}.npz"
        if use_cache:
            data = read_cache(path, OmniglotData._from_npz, what="Omniglot cache file")
            if data is not None:
                if data.skipped:
                    warnings.warn(
                        f"Omniglot data from the cache {path} leaves out {len(data.skipped)} "
                        f"unreadable files: {'; '.join(data.skipped[:5])}"
                        + (" ..." if len(data.skipped) > 5 else ""),
                        stacklevel=3,
                    )
                return data
        data = build()
        if use_cache:
            write_cache(path, data._to_arrays(), what="Omniglot cache file")
        return data

    searched = []
    if source in ("auto", "local"):
        candidates = [data_dir if data_dir is not None else default_omniglot_dir()]
        for root in candidates:
            searched.append(root)
            zips, pngs = _scan_local(root)
            if zips or pngs:
                items = _local_fingerprint(root, zips, pngs)
                return cached(
                    "local",
                    items,
                    functools.partial(
                        _decode_local, zips, pngs, image_size, invert, str(root), skip_corrupt
                    ),
                )
        if source == "local":
            raise OmniglotNotFoundError(_not_found_message(searched, None))

    tfds_key = [str(tfds_data_dir), splits]
    try:
        return cached(
            "tfds",
            tfds_key,
            lambda: _decode_tfds(splits, image_size, invert, tfds_data_dir, download),
        )
    except OmniglotNotFoundError:
        raise
    except Exception as err:  # noqa: BLE001 - tfds raises many kinds when offline/missing
        reason = str(err) if isinstance(err, _Offline) else f"{type(err).__name__}: {err}".strip()
        if len(reason) > 300:
            reason = reason[:300] + "..."
        raise OmniglotNotFoundError(_not_found_message(searched, reason)) from err


# ----------------------------------------------------------------------------------------
# tasks


def _stable_hash(text):
    return zlib.crc32(text.encode("utf-8"))


class OmniglotTasks:
    """The multi-shot Omniglot task distribution: one 20-way task per alphabet.

    Alphabets with fewer than ``num_classes`` characters are dropped. The remaining
    alphabets are shuffled with ``seed`` and split into meta-test (held out for final
    evaluation), meta-validation and meta-train alphabets, in that order. For an
    alphabet with more than ``num_classes`` characters, ``num_classes`` of them are
    drawn with a generator seeded by ``(seed, alphabet name)``; labels ``0..num_classes-1``
    follow character name order. For each character the first ``num_test_per_class``
    drawings (in drawer order) are held out as test data, the rest (or the next
    ``num_train_per_class``) are adaptation data. Training pipelines apply the random
    affine augmentation of the protocol: scale ``U[0.8, 1.2]``, rotation
    ``U[0, 360)`` degrees, translation ``U[-0.2, 0.2]`` of width/height.

    Args:
        data: an :class:`OmniglotData`; ``None`` loads one with ``load_kwargs``.
        num_classes: classes per task (characters per alphabet).
        num_test_per_class: held-out drawings per character.
        num_train_per_class: adaptation drawings per character (``None``: all the rest).
        num_meta_train: meta-train alphabets (``None``: all not otherwise used).
        num_meta_val: meta-validation alphabets.
        num_meta_test: held-out meta-test alphabets.
        seed: seed for the alphabet split and character choice.
        augmentation: callable ``f(images, seed)`` for training batches, ``None`` for the
            protocol's random affine transform, or ``False`` for none.
        **load_kwargs: passed to :func:`load_omniglot` when ``data`` is None
            (e.g. ``source``, ``data_dir``, ``cache_dir``).

    Raises:
        TypeError: an argument of the wrong type (e.g. ``num_classes="20"``, a
            non-callable ``augmentation``, ``load_kwargs`` together with ``data``).
        ValueError: a count below its minimum, or split sizes that exceed the usable
            alphabets; each message names the argument and the fix.

    Attributes:
        meta_train, meta_val, meta_test: lists of :class:`ClassificationTask`.
        meta_train_alphabets, meta_val_alphabets, meta_test_alphabets: alphabet names.
        usable_alphabets: all alphabets with enough characters (sorted).
        data: the underlying :class:`OmniglotData`.

    Example:
        >>> tasks = OmniglotTasks(data_dir="../shared/data/omniglot", num_meta_val=1,
        ...                       num_meta_test=2, seed=0)                    # doctest: +SKIP
        >>> task = tasks.meta_train[0]                                        # doctest: +SKIP
        >>> x, y = next(iter(task.train_dataset(batch_size=20, seed=0)))      # doctest: +SKIP
        >>> x.shape, task.num_classes                                         # doctest: +SKIP
        (TensorShape([20, 28, 28, 1]), 20)
    """

    def __init__(
        self,
        data=None,
        *,
        num_classes=20,
        num_test_per_class=5,
        num_train_per_class=None,
        num_meta_train=None,
        num_meta_val=10,
        num_meta_test=10,
        seed=0,
        augmentation=None,
        **load_kwargs,
    ):
        if data is None:
            data = load_omniglot(**load_kwargs)
        elif load_kwargs:
            raise TypeError(
                f"load_omniglot arguments {sorted(load_kwargs)} given together with data; "
                "pass either data or the arguments of load_omniglot"
            )
        elif not isinstance(data, OmniglotData):
            raise TypeError(
                f"data must be an OmniglotData (from load_omniglot) or None, got "
                f"{type(data).__name__}"
            )
        self.data = data
        self.num_classes = check_int(
            "num_classes", num_classes, minimum=2, hint="characters per alphabet task, e.g. 20"
        )
        self.num_test_per_class = check_int(
            "num_test_per_class",
            num_test_per_class,
            minimum=0,
            hint="held-out drawings per character, e.g. 5",
        )
        self.num_train_per_class = check_int(
            "num_train_per_class",
            num_train_per_class,
            minimum=1,
            allow_none=True,
            hint="adaptation drawings per character; None uses all the rest",
        )
        self.seed = check_int("seed", seed, minimum=0, hint="seed of the alphabet split")
        num_meta_train = check_int(
            "num_meta_train",
            num_meta_train,
            minimum=0,
            allow_none=True,
            hint="None uses every alphabet not held out",
        )
        num_meta_val = check_int("num_meta_val", num_meta_val, minimum=0)
        num_meta_test = check_int("num_meta_test", num_meta_test, minimum=0)

        if augmentation is None:
            augmentation = functools.partial(random_affine, fill_value=data.background)
        elif augmentation is False:
            augmentation = None
        elif not callable(augmentation):
            raise TypeError(
                "augmentation must be a callable f(images, seed), None (the protocol's random "
                f"affine transform) or False (none); got {augmentation!r}"
            )
        self.augmentation = augmentation

        self.usable_alphabets = data.usable_alphabets(self.num_classes)
        total = len(self.usable_alphabets)
        rest = total - num_meta_val - num_meta_test
        num_meta_train = rest if num_meta_train is None else num_meta_train
        if num_meta_train < 0 or num_meta_train > rest:
            raise ValueError(
                f"cannot split {total} usable alphabets (with >= {self.num_classes} characters) "
                f"into num_meta_train={num_meta_train}, num_meta_val={num_meta_val}, "
                f"num_meta_test={num_meta_test}; lower the split sizes"
            )
        order = np.random.default_rng(self.seed).permutation(total)
        shuffled = [self.usable_alphabets[i] for i in order]
        self.meta_test_alphabets = shuffled[:num_meta_test]
        self.meta_val_alphabets = shuffled[num_meta_test : num_meta_test + num_meta_val]
        start = num_meta_test + num_meta_val
        self.meta_train_alphabets = shuffled[start : start + num_meta_train]

        self._tasks = {}
        self._rows = {}
        self.meta_train = [self.task(a) for a in self.meta_train_alphabets]
        self.meta_val = [self.task(a) for a in self.meta_val_alphabets]
        self.meta_test = [self.task(a) for a in self.meta_test_alphabets]

    def task(self, alphabet):
        """The :class:`ClassificationTask` of one usable alphabet (built once, then reused).

        Args:
            alphabet: alphabet name.

        Returns:
            A :class:`ClassificationTask` with ``x_train (N, H, W, 1)``, ``y_train``,
            ``x_test``, ``y_test`` and ``class_names``.

        Example:
            >>> greek = tasks.task("Greek")   # doctest: +SKIP
        """
        if alphabet in self._tasks:
            return self._tasks[alphabet]
        if alphabet not in self.usable_alphabets:
            raise KeyError(
                f"alphabet {alphabet!r} is not usable (unknown or fewer than "
                f"{self.num_classes} characters); usable: {self.usable_alphabets}"
            )
        data = self.data
        chars = data.characters_of(alphabet)
        rng = np.random.default_rng([self.seed, _stable_hash(alphabet)])
        chosen = np.sort(rng.choice(chars, size=self.num_classes, replace=False))
        train_rows, train_labels, test_rows, test_labels = [], [], [], []
        for label, char in enumerate(chosen):
            rows = data.drawings_of(int(char))
            need = self.num_test_per_class + (self.num_train_per_class or 1)
            if len(rows) < need:
                raise ValueError(
                    f"character {data.character_names[char]!r} has {len(rows)} drawings, "
                    f"fewer than the {need} needed"
                )
            test = rows[: self.num_test_per_class]
            train = rows[self.num_test_per_class :]
            if self.num_train_per_class is not None:
                train = train[: self.num_train_per_class]
            train_rows.append(train)
            test_rows.append(test)
            train_labels.append(np.full(len(train), label))
            test_labels.append(np.full(len(test), label))
        train_rows = np.concatenate(train_rows)
        test_rows = np.concatenate(test_rows)

        def images(rows):
            return data.images[rows].astype(np.float32)[..., None] / 255.0

        task = ClassificationTask(
            images(train_rows),
            np.concatenate(train_labels),
            images(test_rows),
            np.concatenate(test_labels),
            num_classes=self.num_classes,
            name=alphabet,
            class_names=[data.character_names[c] for c in chosen],
            augmentation=self.augmentation,
        )
        self._tasks[alphabet] = task
        self._rows[alphabet] = (train_rows, test_rows)
        return task

    def drawing_indices(self, alphabet):
        """Rows of ``data.images`` behind a task's training and test arrays.

        Args:
            alphabet: alphabet name of a usable alphabet.

        Returns:
            ``(train_rows, test_rows)`` int arrays, aligned with ``x_train`` / ``x_test``.

        Example:
            >>> train_rows, test_rows = tasks.drawing_indices("Greek")   # doctest: +SKIP
        """
        self.task(alphabet)
        train_rows, test_rows = self._rows[alphabet]
        return train_rows.copy(), test_rows.copy()

    def split(self, name):
        """The task list of a split.

        Args:
            name: ``"train"``, ``"val"`` or ``"test"`` (``"meta_train"`` etc. also accepted).

        Returns:
            list of :class:`ClassificationTask`.

        Example:
            >>> len(tasks.split("test"))   # doctest: +SKIP
        """
        if not isinstance(name, str):
            raise TypeError(f"split must be 'train', 'val' or 'test', got {name!r}")
        key = name[5:] if name.startswith("meta_") else name
        splits = {"train": self.meta_train, "val": self.meta_val, "test": self.meta_test}
        if key not in splits:
            raise ValueError(f"split must be 'train', 'val' or 'test', got {name!r}")
        return splits[key]

    def sample(self, num_tasks, split="train", rng=None, replace=True):
        """Draw a meta-batch of tasks from a split.

        Args:
            num_tasks: number of tasks to draw.
            split: ``"train"``, ``"val"`` or ``"test"``.
            rng: numpy ``Generator`` or int seed (``None``: fresh randomness).
            replace: sample with replacement (as in the protocol's task batches).

        Returns:
            list of :class:`ClassificationTask`.

        Example:
            >>> batch = tasks.sample(20, rng=0)   # doctest: +SKIP
        """
        num_tasks = check_int("num_tasks", num_tasks, minimum=1, hint="tasks per meta-batch")
        replace = check_bool("replace", replace)
        pool = self.split(split)
        if not pool:
            raise ValueError(
                f"split {split!r} has no tasks; give it alphabets "
                f"(num_meta_{split.replace('meta_', '')} when building OmniglotTasks)"
            )
        if not replace and num_tasks > len(pool):
            raise ValueError(
                f"cannot draw num_tasks={num_tasks} distinct tasks from the {len(pool)} of split "
                f"{split!r}; lower num_tasks or pass replace=True"
            )
        if isinstance(rng, bool) or not (
            rng is None or isinstance(rng, (np.random.Generator, int, np.integer))
        ):
            raise TypeError(f"rng must be a numpy Generator, an int seed or None, got {rng!r}")
        idx = as_generator(rng).choice(len(pool), size=num_tasks, replace=replace)
        return [pool[i] for i in idx]

    def __repr__(self):
        return (
            f"OmniglotTasks(meta_train={len(self.meta_train)}, meta_val={len(self.meta_val)}, "
            f"meta_test={len(self.meta_test)}, num_classes={self.num_classes}, seed={self.seed})"
        )
