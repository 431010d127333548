"""Few-shot N-way K-shot episodes (the protocol of Vinyals et al., 2016).

An episode draws ``N`` distinct classes from a pool, then ``K`` support and ``L``
query examples per class, all distinct; labels are relabelled ``0..N-1`` in the
order the classes were drawn. Support and query arrays are class-major: rows
``[c*K, (c+1)*K)`` of the support set belong to class ``c``.

Sampling is stateless: episode ``i`` of a sampler with seed ``s`` is always the
same, whether drawn with :meth:`EpisodeSampler.sample` or from
:meth:`EpisodeSampler.dataset`.
"""

import collections
import os
import warnings
import zlib

import numpy as np
import tensorflow as tf

from warpkeras.data._cache import (
    CorruptFileError,
    check_bool,
    check_dir,
    check_int,
    file_signature,
    fingerprint,
    read_cache,
    report_corrupt,
    resolve_cache_dir,
    seed_pair,
    write_cache,
)
from warpkeras.data.tasks import ClassificationTask

_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


class Episode(
    collections.namedtuple("Episode", ["support_x", "support_y", "query_x", "query_y", "classes"])
):
    """One few-shot episode as numpy arrays.

    Attributes:
        support_x: support inputs ``(N*K, ...)``.
        support_y: support labels in ``0..N-1``, shape ``(N*K,)``.
        query_x: query inputs ``(N*L, ...)``.
        query_y: query labels in ``0..N-1``, shape ``(N*L,)``.
        classes: the original class labels of the ``N`` episode classes.

    Example:
        >>> sampler = EpisodeSampler(x, y, num_ways=5, num_shots=1, num_queries=5)  # doctest: +SKIP
        >>> task = sampler.sample(0).as_task()                                      # doctest: +SKIP
    """

    __slots__ = ()

    def as_task(self, name="episode", augmentation=None):
        """Wrap the episode as a :class:`ClassificationTask` (support = train, query = test).

        Args:
            name: the task name.
            augmentation: optional augmentation callable for the training pipeline.

        Returns:
            A :class:`ClassificationTask`.

        Example:
            >>> task = ep.as_task()   # doctest: +SKIP
        """
        return ClassificationTask(
            self.support_x,
            self.support_y,
            self.query_x,
            self.query_y,
            num_classes=len(self.classes),
            name=name,
            class_names=[str(c) for c in self.classes],
            augmentation=augmentation,
        )


class EpisodeSampler:
    """Draws N-way K-shot episodes from any labelled array data.

    Args:
        x: inputs, array ``(M, ...)``. ``uint8`` inputs are returned as float32 / 255;
            other dtypes are returned as float32.
        y: integer class labels ``(M,)`` (any values, e.g. global character ids).
        num_ways: classes per episode (``N``).
        num_shots: support examples per class (``K``).
        num_queries: query examples per class (``L``).
        seed: integer seed (``None``: fresh randomness per sampler).
        classes: optional subset of labels to draw classes from (e.g. a split).

    Classes with fewer than ``K + L`` examples are left out (with a warning).

    Raises:
        TypeError: non-integer counts, labels or seed (the message names the argument).
        ValueError: counts below their minimum, ``x``/``y`` of different lengths, or too
            few classes with ``K + L`` examples for ``N``-way episodes.

    Example:
        >>> import numpy as np
        >>> x = np.random.rand(200, 8).astype("float32"); y = np.repeat(np.arange(10), 20)
        >>> sampler = EpisodeSampler(x, y, num_ways=5, num_shots=1, num_queries=3, seed=0)
        >>> ep = sampler.sample(0)
        >>> ep.support_x.shape, ep.query_y.shape
        ((5, 8), (15,))
        >>> ds = sampler.dataset(num_episodes=10)   # ((support_x, support_y), (query_x, query_y))
    """

    def __init__(self, x, y, num_ways=5, num_shots=1, num_queries=15, seed=None, classes=None):
        x = np.asarray(x)
        y = np.asarray(y)
        if x.ndim < 1 or len(x) == 0:
            raise ValueError(f"x must hold at least one example (M, ...), got shape {x.shape}")
        if y.ndim != 1 or len(y) != len(x):
            raise ValueError(
                f"y must be 1-D with one label per row of x; got x {x.shape}, y {y.shape}"
            )
        if not np.issubdtype(y.dtype, np.integer):
            raise TypeError(f"y must hold integer labels, got dtype {y.dtype}")
        self.num_ways = check_int("num_ways", num_ways, minimum=1, hint="classes per episode")
        self.num_shots = check_int(
            "num_shots", num_shots, minimum=1, hint="support examples per class"
        )
        self.num_queries = check_int(
            "num_queries", num_queries, minimum=0, hint="query examples per class"
        )
        if isinstance(seed, bool) or not (seed is None or isinstance(seed, (int, np.integer))):
            raise TypeError(f"seed must be a non-negative int or None, got {seed!r}")
        if seed is not None and seed < 0:
            raise ValueError(f"seed must be a non-negative int or None, got {seed}")
        per_class = self.num_shots + self.num_queries
        pool = np.unique(y) if classes is None else np.unique(np.asarray(classes))
        missing = np.setdiff1d(pool, y)
        if len(missing):
            raise ValueError(f"classes {missing[:10].tolist()} do not occur in y")
        counts = np.array([(y == c).sum() for c in pool])
        small = pool[counts < per_class]
        if len(small):
            warnings.warn(
                f"EpisodeSampler: leaving out {len(small)} classes with fewer than "
                f"{per_class} examples",
                stacklevel=2,
            )
        pool = pool[counts >= per_class]
        if len(pool) < self.num_ways:
            raise ValueError(
                f"only {len(pool)} classes have at least {per_class} examples "
                f"(num_shots + num_queries); cannot draw {self.num_ways}-way episodes: lower "
                "num_ways, num_shots or num_queries"
            )
        self.classes = pool
        rows = [np.flatnonzero(y == c) for c in pool]
        width = max(len(r) for r in rows)
        table = np.full((len(pool), width), -1, dtype=np.int64)
        for i, r in enumerate(rows):
            table[i, : len(r)] = r
        self._table = tf.constant(table)
        self._counts = tf.constant([len(r) for r in rows], dtype=tf.int64)
        self._class_values = tf.constant(pool.astype(np.int64))
        if x.dtype == np.uint8:
            self._x = tf.constant(x)
            self._scale = 1.0 / 255.0
        else:
            self._x = tf.constant(x.astype(np.float32, copy=False))
            self._scale = None
        self.seed = seed
        self._key = seed_pair(seed, 1)[0]
        self._episode_fn = tf.function(self._episode, reduce_retracing=True)

    @property
    def num_classes(self):
        """Number of classes episodes are drawn from."""
        return len(self.classes)

    def _episode(self, index):
        index = tf.cast(index, tf.int64)
        key = tf.constant(self._key, tf.int64)
        k, total = self.num_shots, self.num_shots + self.num_queries
        n = self.num_ways
        perm = tf.random.experimental.stateless_shuffle(
            tf.range(tf.shape(self._table, out_type=tf.int64)[0]),
            seed=tf.stack([key, 2 * index]),
        )
        chosen = perm[:n]
        rows = tf.gather(self._table, chosen)
        counts = tf.gather(self._counts, chosen)
        width = tf.shape(rows, out_type=tf.int64)[1]
        scores = tf.random.stateless_uniform(tf.shape(rows), seed=tf.stack([key, 2 * index + 1]))
        valid = tf.range(width)[tf.newaxis, :] < counts[:, tf.newaxis]
        scores = tf.where(valid, scores, -1.0)
        picks = tf.math.top_k(scores, k=total, sorted=True).indices
        picked = tf.gather(rows, picks, batch_dims=1)
        support_idx = tf.reshape(picked[:, :k], [-1])
        query_idx = tf.reshape(picked[:, k:], [-1])
        labels = tf.range(n, dtype=tf.int32)

        def fetch(idx):
            out = tf.gather(self._x, idx)
            out = tf.cast(out, tf.float32)
            if self._scale is not None:
                out = out * self._scale
            return out

        support_y = tf.repeat(labels, k)
        query_y = tf.repeat(labels, self.num_queries)
        classes = tf.gather(self._class_values, chosen)
        return fetch(support_idx), support_y, fetch(query_idx), query_y, classes

    def sample(self, index=0):
        """Episode number ``index`` as numpy arrays.

        Args:
            index: non-negative episode number; the same index gives the same episode.

        Returns:
            An :class:`Episode`.

        Example:
            >>> ep = sampler.sample(3)   # doctest: +SKIP
        """
        index = check_int("index", index, minimum=0, hint="the episode number")
        out = self._episode_fn(tf.constant(index, tf.int64))
        return Episode(*(t.numpy() for t in out))

    def dataset(self, num_episodes=None, start=0):
        """A tf.data pipeline of episodes ``((support_x, support_y), (query_x, query_y))``.

        Args:
            num_episodes: number of episodes; ``None`` for an endless stream.
            start: index of the first episode.

        Returns:
            A ``tf.data.Dataset``; element ``j`` equals ``sample(start + j)``.

        Example:
            >>> for (sx, sy), (qx, qy) in sampler.dataset(num_episodes=4): ...   # doctest: +SKIP
        """
        num_episodes = check_int("num_episodes", num_episodes, minimum=0, allow_none=True)
        start = check_int("start", start, minimum=0, hint="index of the first episode")
        if num_episodes is None:
            indices = tf.data.Dataset.counter(start=start)
        else:
            indices = tf.data.Dataset.range(start, start + num_episodes)

        def to_pair(index):
            sx, sy, qx, qy, _ = self._episode(index)
            return (sx, sy), (qx, qy)

        return indices.map(
            to_pair, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
        ).prefetch(tf.data.AUTOTUNE)


def rotate_classes(x, y, rotations=(0, 1, 2, 3)):
    """Create new classes by rotating images by multiples of 90 degrees.

    Common for few-shot Omniglot: each character rotated by 0/90/180/270 degrees
    counts as its own class. New label = ``old_label * len(rotations) + j`` for the
    ``j``-th rotation.

    Args:
        x: images ``(M, H, W, ...)`` with ``H == W``.
        y: integer labels ``(M,)``.
        rotations: multiples of 90 degrees (counter-clockwise) to include.

    Returns:
        ``(x_rot, y_rot)`` with ``len(rotations) * M`` rows.

    Example:
        >>> import numpy as np
        >>> xr, yr = rotate_classes(np.zeros((3, 4, 4, 1)), np.array([0, 1, 1]))
        >>> xr.shape, sorted(set(yr.tolist()))
        ((12, 4, 4, 1), [0, 1, 2, 3, 4, 5, 6, 7])
    """
    x = np.asarray(x)
    y = np.asarray(y)
    if x.ndim < 3 or x.shape[1] != x.shape[2]:
        raise ValueError(f"x must hold square images (M, H, H, ...), got shape {x.shape}")
    if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(
            f"y must hold one integer label per image, shape ({len(x)},); got shape {y.shape} "
            f"and dtype {y.dtype}"
        )
    if isinstance(rotations, (str, bytes)) or not np.iterable(rotations):
        raise TypeError(f"rotations must be a sequence of ints (quarter turns), got {rotations!r}")
    rotations = tuple(
        check_int("rotations", r, hint="quarter turns, e.g. (0, 1, 2, 3)") for r in rotations
    )
    if not rotations:
        raise ValueError("rotations must not be empty; pass e.g. rotations=(0, 1, 2, 3)")
    if len(set(r % 4 for r in rotations)) != len(rotations):
        raise ValueError(
            f"rotations {rotations} repeat a rotation (modulo 4 quarter turns), which would "
            "make two labels for the same images; pass distinct values, e.g. (0, 1, 2, 3)"
        )
    xs = [np.rot90(x, k=r, axes=(1, 2)) for r in rotations]
    ys = [y * len(rotations) + j for j in range(len(rotations))]
    return np.concatenate(xs), np.concatenate(ys)


def load_image_folder(
    root,
    image_size=None,
    mode="RGB",
    cache_dir=None,
    use_cache=True,
    extensions=_IMAGE_EXTENSIONS,
    skip_corrupt=False,
):
    """Load an image data set laid out as ``<root>/<class>/<image>`` (e.g. a miniImageNet split).

    Class names are the sub-folder names, sorted; labels are their positions.
    Images below a class folder (at any depth) belong to that class. The decoded
    arrays are cached as ``.npz`` in ``cache_dir`` (default :func:`default_cache_dir`),
    keyed by the name, size and modification time of every image, so an image replaced
    in place is decoded again; a damaged cache file is rebuilt with a warning.

    Args:
        root: the folder holding one sub-folder per class (str or path).
        image_size: resize to ``(size, size)`` (or a ``(height, width)`` pair) pixels with
            area averaging; ``None`` keeps the stored size (then all must agree).
        mode: PIL colour mode, ``"RGB"`` (3 channels) or ``"L"`` (greyscale, 1 channel).
        cache_dir: cache folder; ``None`` uses the default.
        use_cache: read and write the cache.
        extensions: file name ending, or endings, treated as images (e.g. ``".png"``).
        skip_corrupt: skip images that cannot be read (damaged, truncated, or not images)
            with a warning naming each, instead of raising.

    Returns:
        ``(x, y, class_names)``: uint8 images ``(M, H, W, C)``, int32 labels ``(M,)``
        and the list of class names. Feed them to :class:`EpisodeSampler`.

    Raises:
        FileNotFoundError: ``root`` does not exist or holds no images.
        CorruptFileError: (a ``ValueError`` and ``OSError``) an image cannot be read; the
            message names the file. Not raised with ``skip_corrupt=True``.
        TypeError, ValueError: a bad argument; the message names it.
        ImportError: Pillow is not installed (``pip install "warpkeras[data]"``).

    Example:
        >>> x, y, names = load_image_folder("miniimagenet/train", image_size=84)  # doctest: +SKIP
        >>> sampler = EpisodeSampler(x, y, num_ways=5, num_shots=5,               # doctest: +SKIP
        ...                          num_queries=15)
    """
    try:
        from PIL import Image
    except ImportError as e:
        raise ImportError(
            'load_image_folder needs Pillow to decode images: pip install "warpkeras[data]"'
        ) from e

    if not isinstance(mode, str) or mode not in ("RGB", "L"):
        raise ValueError(f"mode must be 'RGB' or 'L', got {mode!r}")
    root = check_dir("root", root, allow_none=False)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist; pass root=<existing folder>")
    if image_size is None:
        size = None
    elif np.ndim(image_size) == 0:
        side = check_int("image_size", image_size, minimum=1, hint="side in pixels")
        size = (side, side)
    else:
        if len(image_size) != 2:
            raise ValueError(
                f"image_size must be an int or a (height, width) pair, got {image_size!r}"
            )
        size = tuple(
            check_int("image_size", v, minimum=1, hint="(height, width) in pixels")
            for v in image_size
        )
    use_cache = check_bool("use_cache", use_cache)
    skip_corrupt = check_bool("skip_corrupt", skip_corrupt)
    cache_dir = check_dir("cache_dir", cache_dir)
    if isinstance(extensions, str):
        extensions = (extensions,)
    if (
        not np.iterable(extensions)
        or not extensions
        or not all(isinstance(e, str) and e for e in extensions)
    ):
        raise ValueError(
            f"extensions must be a non-empty sequence of file endings, e.g. ('.png', '.jpg'); "
            f"got {extensions!r}"
        )
    extensions = tuple(e.lower() for e in extensions)
    class_names = sorted(
        d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")
    )
    files = []
    for label, name in enumerate(class_names):
        for dirpath, dirnames, filenames in os.walk(root / name):
            dirnames.sort()
            for filename in sorted(filenames):
                if filename.lower().endswith(extensions) and not filename.startswith("."):
                    files.append((os.path.join(dirpath, filename), label))
    if not files:
        raise FileNotFoundError(
            f"no images found in {root}: expected <root>/<class>/<image> with endings {extensions}"
        )
    key = fingerprint(
        [2, str(root.resolve()), size, mode, skip_corrupt, len(files)]
        + [file_signature(p, root) for p, _ in files]
    )
    cache_path = resolve_cache_dir(cache_dir) / "image_folders" / f"{root.name}_{key}.npz"

    def read(path):
        with np.load(path, allow_pickle=False) as f:
            return f["x"], f["y"], f["class_names"].tolist(), f["skipped"].tolist()

    if use_cache:
        cached = read_cache(cache_path, read, what="image-folder cache file")
        if cached is not None:
            if cached[3]:
                warnings.warn(
                    f"images from the cache {cache_path} leave out {len(cached[3])} unreadable "
                    f"files: {'; '.join(cached[3][:5])}" + (" ..." if len(cached[3]) > 5 else ""),
                    stacklevel=2,
                )
            return cached[:3]
    images, labels, skipped = [], [], []
    for path, label in files:
        try:
            with Image.open(path) as img:
                img.load()
                img = img.convert(mode)
                if size is not None and img.size != (size[1], size[0]):
                    img = img.resize((size[1], size[0]), Image.BOX)
                arr = np.asarray(img, dtype=np.uint8)
        except (OSError, ValueError, EOFError, SyntaxError, zlib.error) as err:
            report_corrupt(CorruptFileError(path, None, err), skip_corrupt, skipped)
            continue
        if arr.ndim == 2:
            arr = arr[..., None]
        images.append(arr)
        labels.append(label)
    if not images:
        raise FileNotFoundError(
            f"no readable images in {root} ({len(skipped)} unreadable files skipped)"
        )
    shapes = {a.shape for a in images}
    if len(shapes) > 1:
        raise ValueError(
            f"images in {root} have different sizes {sorted(shapes)[:4]}; pass image_size"
        )
    x = np.stack(images)
    y = np.array(labels, dtype=np.int32)
    if use_cache:
        write_cache(
            cache_path,
            dict(
                x=x,
                y=y,
                class_names=np.array(class_names, dtype=str),
                skipped=np.array(skipped, dtype=str).reshape(-1),
            ),
            what="image-folder cache file",
        )
    return x, y, class_names
