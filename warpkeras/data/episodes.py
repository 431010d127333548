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
import pathlib
import warnings

import numpy as np
import tensorflow as tf

from warpkeras.data._cache import fingerprint, resolve_cache_dir, save_npz, seed_pair
from warpkeras.data.tasks import ClassificationTask

_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


class Episode(
    collections.namedtuple("Episode", ["support_x", "support_y", "query_x", "query_y", "classes"])
):
    """One few-shot episode as numpy arrays.

    Args:
        support_x: support inputs ``(N*K, ...)``.
        support_y: support labels in ``0..N-1``, shape ``(N*K,)``.
        query_x: query inputs ``(N*L, ...)``.
        query_y: query labels in ``0..N-1``, shape ``(N*L,)``.
        classes: the original class labels of the ``N`` episode classes.

    Example:
        >>> ep = EpisodeSampler(x, y, num_ways=5, num_shots=1, num_queries=5).sample(0)  # doctest: +SKIP
        >>> task = ep.as_task()                                                          # doctest: +SKIP
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
        if y.ndim != 1 or len(y) != len(x):
            raise ValueError(f"y must be 1-D with one label per row of x; got x {x.shape}, y {y.shape}")
        if not np.issubdtype(y.dtype, np.integer):
            raise TypeError(f"y must hold integer labels, got dtype {y.dtype}")
        self.num_ways = int(num_ways)
        self.num_shots = int(num_shots)
        self.num_queries = int(num_queries)
        if self.num_ways < 1 or self.num_shots < 1 or self.num_queries < 0:
            raise ValueError(
                "need num_ways >= 1, num_shots >= 1 and num_queries >= 0, got "
                f"{num_ways}, {num_shots}, {num_queries}"
            )
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
                f"only {len(pool)} classes have at least {per_class} examples; "
                f"cannot draw {self.num_ways}-way episodes"
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
        if int(index) < 0:
            raise ValueError(f"index must be non-negative, got {index}")
        out = self._episode_fn(tf.constant(int(index), tf.int64))
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
        if num_episodes is None:
            indices = tf.data.Dataset.counter(start=int(start))
        else:
            indices = tf.data.Dataset.range(int(start), int(start) + int(num_episodes))

        def to_pair(index):
            sx, sy, qx, qy, _ = self._episode(index)
            return (sx, sy), (qx, qy)

        return indices.map(to_pair, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).prefetch(
            tf.data.AUTOTUNE
        )


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
    rotations = tuple(int(r) for r in rotations)
    if not rotations:
        raise ValueError("rotations must not be empty")
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
):
    """Load an image data set laid out as ``<root>/<class>/<image>`` (e.g. a miniImageNet split).

    Class names are the sub-folder names, sorted; labels are their positions.
    Images below a class folder (at any depth) belong to that class. The decoded
    arrays are cached as ``.npz`` in ``cache_dir`` (default :func:`default_cache_dir`).

    Args:
        root: the folder holding one sub-folder per class.
        image_size: resize to ``(size, size)`` (or a ``(height, width)`` pair) with
            area averaging; ``None`` keeps the stored size (then all must agree).
        mode: PIL colour mode, ``"RGB"`` (3 channels) or ``"L"`` (greyscale, 1 channel).
        cache_dir: cache folder; ``None`` uses the default.
        use_cache: read and write the cache.
        extensions: file name endings treated as images.

    Returns:
        ``(x, y, class_names)``: uint8 images ``(M, H, W, C)``, int32 labels ``(M,)``
        and the list of class names. Feed them to :class:`EpisodeSampler`.

    Example:
        >>> x, y, names = load_image_folder("miniimagenet/train", image_size=84)   # doctest: +SKIP
        >>> sampler = EpisodeSampler(x, y, num_ways=5, num_shots=5, num_queries=15)  # doctest: +SKIP
    """
    from PIL import Image

    if mode not in ("RGB", "L"):
        raise ValueError(f"mode must be 'RGB' or 'L', got {mode!r}")
    root = pathlib.Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    if image_size is not None:
        size = (int(image_size), int(image_size)) if np.isscalar(image_size) else tuple(image_size)
    else:
        size = None
    extensions = tuple(e.lower() for e in extensions)
    class_names = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
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
        [1, str(root.resolve()), size, mode, len(files)]
        + [(os.path.relpath(p, root), os.path.getsize(p)) for p, _ in files]
    )
    cache_path = resolve_cache_dir(cache_dir) / "image_folders" / f"{root.name}_{key}.npz"
    if use_cache and cache_path.exists():
        try:
            with np.load(cache_path, allow_pickle=False) as f:
                return f["x"], f["y"], f["class_names"].tolist()
        except (OSError, KeyError, ValueError):
            pass
    images = []
    for path, _ in files:
        with Image.open(path) as img:
            img = img.convert(mode)
            if size is not None and img.size != (size[1], size[0]):
                img = img.resize((size[1], size[0]), Image.BOX)
            arr = np.asarray(img, dtype=np.uint8)
        if arr.ndim == 2:
            arr = arr[..., None]
        images.append(arr)
    shapes = {a.shape for a in images}
    if len(shapes) > 1:
        raise ValueError(f"images in {root} have different sizes {sorted(shapes)[:4]}; pass image_size")
    x = np.stack(images)
    y = np.array([label for _, label in files], dtype=np.int32)
    if use_cache:
        save_npz(cache_path, x=x, y=y, class_names=np.array(class_names, dtype=str))
    return x, y, class_names
