"""Tasks: what a meta-learner adapts to.

A `Task` takes its data in the forms `keras.Model.fit` takes: ``(x, y)`` or
``(x, y, sample_weight)``, each an array or a dict / list of arrays for several inputs or
outputs, as arrays, a `tf.data.Dataset` of such batches, or a generator. It supplies

* **adaptation batches** for the task loss L_task (the inner loop),
* **meta batches** for the meta-objective L_meta (the same data in other batches by
  default; held-out data if given),
* optionally **test data** for evaluation, and a display name.

A *task source* is what trainers sample tasks from: a list of tasks (sampled with
replacement by the trainer's seeded generator, so runs are reproducible and resumable), a
`TaskSampler` (anything with ``sample(rng, n)``), or a plain iterator of tasks (consumed in
order; such runs cannot be replayed exactly on resume).

Example:

```python
import numpy as np, warpkeras
x, y = np.random.randn(100, 8).astype("float32"), np.random.randint(0, 3, 100)
task = warpkeras.Task(train=(x[:80], y[:80]), test=(x[80:], y[80:]), batch_size=20)
batches = task.batches("train", np.random.default_rng(0))
xb, yb = next(batches)
```
"""

import collections.abc

import numpy as np
import tensorflow as tf

from warpkeras import _validation as _v


def _is_array(t):
    return hasattr(t, "shape") and hasattr(t, "__getitem__") and not isinstance(t, tf.data.Dataset)


def _is_arrays(data):
    """``(x, y)`` or ``(x, y, sample_weight)`` arrays, as `keras.Model.fit` takes them: each
    element one array or a structure of arrays (a tuple, list or dict of inputs or
    outputs)."""
    if not (isinstance(data, (tuple, list)) and len(data) in (2, 3)):
        return False
    leaves = [tf.nest.flatten(part) for part in data]
    return bool(leaves[0]) and all(_is_array(t) for part in leaves for t in part)


def _paths(name, structure):
    """``[(label, leaf)]`` of a structure, labelled as in ``y['reg']`` / ``x[1]``."""
    if not tf.nest.is_nested(structure):
        return [(name, structure)]
    out = []
    for path, leaf in zip(_flat_paths(structure), tf.nest.flatten(structure)):
        out.append((name + "".join(f"[{p!r}]" for p in path), leaf))
    return out


def _flat_paths(structure):
    if isinstance(structure, dict):
        return [(k,) + rest for k in sorted(structure) for rest in _flat_paths(structure[k])]
    if isinstance(structure, (list, tuple)):
        return [(i,) + rest for i, v in enumerate(structure) for rest in _flat_paths(v)]
    return [()]


def _rows(x, where=None, what="x"):
    """The number of examples in `x` (a structure of arrays sharing their first dimension).

    Raises:
        ValueError: arrays that differ in their number of rows, naming each.
    """
    parts = _paths(what, x)
    lengths = {len(t) for _, t in parts}
    if len(lengths) != 1:
        detail = ", ".join(f"{label} has {len(t)}" for label, t in parts)
        prefix = f"{where}: " if where else ""
        raise ValueError(
            f"{prefix}the arrays of `{what}` differ in their number of rows "
            f"({detail}); give every input, label and weight one row per "
            "example."
        )
    return lengths.pop()


def _check_rows(data, what, where):
    """One number of rows for every array of ``(x, y[, sample_weight])``; returns it."""
    names = ("x", "y", "sample_weight")
    parts = [(label, t) for name, part in zip(names, data) for label, t in _paths(name, part)]
    lengths = {len(t) for _, t in parts}
    if len(lengths) != 1:
        detail = ", ".join(f"{label} has {len(t)}" for label, t in parts)
        raise ValueError(
            f"{where}: the arrays of `{what}` differ in their number of rows "
            f"({detail}); give one label (and one sample weight) per example."
        )
    return lengths.pop()


def _materialise(iterator, where):
    """The batches of a finite iterator of ``(x, y[, sample_weight])`` concatenated into
    arrays (test data given as a generator)."""
    parts = []
    for batch in iterator:
        if not isinstance(batch, (tuple, list)) or len(batch) not in (2, 3):
            raise ValueError(
                f"{where}: the `test` generator yields {_v.describe(batch)}; a batch must be "
                "(x, y) or (x, y, sample_weight), as keras.Model.evaluate takes them."
            )
        if parts and len(batch) != len(parts[0]):
            raise ValueError(
                f"{where}: the `test` generator yields batches of "
                f"{len(parts[0])} and of {len(batch)} elements; give every "
                "batch the same form."
            )
        parts.append(tf.nest.map_structure(np.asarray, tuple(batch)))
    if not parts:
        raise ValueError(f"{where}: the `test` generator yields no batches.")
    return tf.nest.map_structure(lambda *a: np.concatenate(a), *parts)


def _check_dataset(data, what, where):
    """Refuses a dataset whose elements are not ``(x, y)`` / ``(x, y, sample_weight)``."""
    spec = data.element_spec
    if isinstance(spec, (tuple, list)) and len(spec) in (2, 3):
        return
    kind = f"a tuple of {len(spec)}" if isinstance(spec, (tuple, list)) else type(spec).__name__
    raise ValueError(
        f"{where}: the `{what}` dataset yields {kind} elements; a batch must be (x, y) or "
        "(x, y, sample_weight), as keras.Model.fit takes them. Map it to that form, e.g. "
        "ds.map(lambda d: (d['image'], d['label']))."
    )


class Task:
    """One task: data for adaptation, for the meta-objective and for evaluation.

    Args:
        train: adaptation data, in the forms `keras.Model.fit` takes: arrays ``(x, y)``
            or ``(x, y, sample_weight)``, each an array or a tuple / list / dict of arrays
            for several inputs or outputs (mini-batches are drawn from them by the
            trainer's generator, reshuffled every epoch), a `tf.data.Dataset` of such
            batches (read as a repeated stream from a seeded position; see `batches`), or
            a callable ``rng -> iterator`` of such batches (e.g. a generator).
        meta: data for the meta-objective, in any of the same forms. `None` draws other
            mini-batches of `train` (WarpGrad App. F evaluates L_meta and L_task on
            different batches of the same task data).
        test: held-out ``(x, y)`` / ``(x, y, sample_weight)`` arrays, a finite
            `tf.data.Dataset` of such batches, or a finite generator (iterator) of them
            (read once, here, and kept as arrays), for evaluation.
        batch_size: mini-batch size when `train` / `meta` are arrays: an integer >= 1
            (a task with fewer examples uses all of them in every batch).
        augment: optional ``augment(x, rng) -> x`` applied to adaptation batches drawn from
            arrays (e.g. random affine transforms of images).
        name: display name (a string; default ``"task"``).
        info: free-form dict (e.g. the generating parameters of a synthetic task).

    Raises:
        TypeError: `train` / `meta` / `test` of an unsupported kind, a non-integer
            `batch_size`, a non-callable `augment`, a non-string `name` or a non-dict
            `info`.
        ValueError: `batch_size` < 1; array data whose arrays (inputs, labels, weights)
            differ in their number of rows, naming each, or that have no rows; a dataset
            whose elements are not ``(x, y)`` / ``(x, y, sample_weight)``.
    """

    def __init__(
        self, train, meta=None, test=None, batch_size=32, augment=None, name=None, info=None
    ):
        if name is not None and not isinstance(name, str):
            raise TypeError(
                f"Task: name={_v.describe(name)} is not valid: expected a string "
                "(e.g. name='alphabet-3') or None."
            )
        self.name = name or "task"
        where = f"Task '{self.name}'"
        self._check(train, "train", where)
        if meta is not None:
            self._check(meta, "meta", where)
        if (
            test is not None
            and not _is_arrays(test)
            and not isinstance(test, tf.data.Dataset)
            and isinstance(test, collections.abc.Iterator)
        ):
            test = _materialise(test, where)  # a generator is read once, as `evaluate` does
        if test is not None and not (_is_arrays(test) or isinstance(test, tf.data.Dataset)):
            raise TypeError(
                f"{where}: test={_v.describe(test)} is not valid: expected held-out (x, y) "
                "or (x, y, sample_weight) arrays, a finite tf.data.Dataset or a generator "
                "of such batches, or None."
            )
        for what, data in (("train", train), ("meta", meta), ("test", test)):
            if _is_arrays(data):
                rows = _check_rows(data, what, where)
                if what != "test" and rows == 0:
                    raise ValueError(
                        f"{where}: `{what}` has no examples (0 rows); give at "
                        "least one (x, y) pair."
                    )
            elif isinstance(data, tf.data.Dataset):
                _check_dataset(data, what, where)
        self.batch_size = _v.check_int(batch_size, "batch_size", minimum=1, where=where, example=32)
        self.augment = _v.check_callable(
            augment, "augment", where=where, signature="augment(x, rng) -> x"
        )
        if info is not None and not isinstance(info, collections.abc.Mapping):
            raise TypeError(
                f"{where}: info={_v.describe(info)} is not valid: expected a dict "
                "(free-form task information) or None."
            )
        self.train = train
        self.meta = meta
        self.test = test
        self.info = dict(info or {})

    @staticmethod
    def _check(data, what, where="Task"):
        if not (_is_arrays(data) or isinstance(data, tf.data.Dataset) or callable(data)):
            raise TypeError(
                f"{where}: `{what}` must be (x, y) or (x, y, sample_weight) arrays (each an "
                "array or a dict / list of arrays, as keras.Model.fit takes them), a "
                "tf.data.Dataset of such batches, or a callable rng -> iterator of them; "
                f"got {type(data).__name__}."
            )

    def batches(self, which="train", rng=None):
        """An endless iterator of ``(x, y)`` (or ``(x, y, sample_weight)``) batches of
        adaptation (`"train"`) or meta (`"meta"`) data.

        Arrays are drawn as shuffled mini-batches by `rng`. A finite `tf.data.Dataset` of
        n batches is read as an endless, repeated stream that starts at a batch position
        drawn by `rng` (uniform over the n positions, so every batch is reached across
        meta steps, and the same `rng` replays the same batches: runs resumed from a
        checkpoint see what the uninterrupted run saw). A dataset of infinite or unknown
        cardinality cannot be positioned: it is read as one stream that continues where
        the previous call stopped (never restarted; its position is not part of a
        checkpoint, so resumed runs read it on from its start; give a finite dataset, e.g.
        ``ds.apply(tf.data.experimental.assert_cardinality(n))``, for replayable runs).

        For a pair of adaptation and meta streams of the same step use `streams`: only it
        guarantees that, with ``meta=None``, the meta batches are other batches than the
        adaptation batch of the same step.

        Args:
            which: ``"train"`` or ``"meta"``.
            rng: a `numpy.random.Generator` (draws the mini-batches from arrays and the
                start position of a finite dataset).

        Returns:
            An iterator of batches in the form of the task's data.

        Raises:
            ValueError: `which` is neither ``"train"`` nor ``"meta"``, or a dataset is
                empty.
        """
        if which not in ("train", "meta"):
            raise ValueError(f"Task '{self.name}': which={which!r}: expected 'train' or 'meta'.")
        rng = rng if rng is not None else np.random.default_rng()
        data = self.train if which == "train" or self.meta is None else self.meta
        augment = self.augment if which == "train" else None
        if _is_arrays(data):
            return _array_batches(data, self.batch_size, rng, augment)
        if isinstance(data, tf.data.Dataset):
            return self._dataset_stream(data, "train" if data is self.train else "meta", rng)
        return iter(data(rng))

    def streams(self, train_rng, meta_rng):
        """The adaptation and meta-objective batch streams of one task for one meta step.

        Equal to ``(batches("train", train_rng), batches("meta", meta_rng))``, except that
        when `meta` is `None` and `train` is a finite `tf.data.Dataset` of n >= 2 batches,
        the meta stream is the adaptation stream shifted by s batches, s drawn by
        `meta_rng` from 1..n-1: at every step the meta batch is another batch than the
        adaptation batch (WarpGrad App. F: L_meta and L_task on different batches of the
        same data). With an infinite dataset both streams read one shared stream, so the
        meta batches are likewise other batches.

        Args:
            train_rng: the `numpy.random.Generator` of the training stream.
            meta_rng: the `numpy.random.Generator` of the meta stream.

        Returns:
            ``(train_iterator, meta_iterator)``; both are lazy (nothing is read until
            `next`).
        """
        data = self.train
        if self.meta is not None or not isinstance(data, tf.data.Dataset):
            return self.batches("train", train_rng), self.batches("meta", meta_rng)
        n = self._cardinality(data, "train")
        if n is None:  # one shared, persistent stream
            return self.batches("train", train_rng), self.batches("train", meta_rng)
        start = int(train_rng.integers(n))
        shift = 1 + int(meta_rng.integers(n - 1)) if n > 1 else 0
        return (_lazy_dataset_stream(data, start), _lazy_dataset_stream(data, (start + shift) % n))

    def _cardinality(self, data, which):
        n = int(data.cardinality())
        if n == 0:
            raise ValueError(
                f"Task '{self.name}': the `{which}` dataset holds no batches; give a dataset "
                "with at least one batch."
            )
        return n if n > 0 else None

    def _dataset_stream(self, data, which, rng):
        n = self._cardinality(data, which)
        if n is not None:
            return _lazy_dataset_stream(data, int(rng.integers(n)))
        streams = self.__dict__.setdefault("_open_streams", {})
        if which not in streams:
            streams[which] = iter(data.repeat())
        return streams[which]

    def test_data(self):
        """Held-out ``(x, y)`` or ``(x, y, sample_weight)`` as arrays (concatenating the
        batches of a dataset), or `None`."""
        if self.test is None:
            return None
        if _is_arrays(self.test):
            return tuple(self.test)
        parts = [tf.nest.map_structure(np.asarray, tuple(batch)) for batch in self.test]
        if not parts:
            raise ValueError(f"Task '{self.name}': the `test` dataset holds no batches.")
        return tf.nest.map_structure(lambda *a: np.concatenate(a), *parts)

    def __repr__(self):
        return f"<Task '{self.name}'>"


def _array_batches(data, batch_size, rng, augment):
    x = data[0]
    n = _rows(x)
    if n == 0:
        raise ValueError("A task has no training examples.")
    batch_size = min(batch_size, n)
    while True:
        order = rng.permutation(n)
        for start in range(0, n - batch_size + 1, batch_size):
            idx = order[start : start + batch_size]
            batch = [tf.nest.map_structure(lambda t, idx=idx: t[idx], part) for part in data]
            if augment is not None:
                batch[0] = augment(batch[0], rng)
            yield tuple(batch)


def _lazy_dataset_stream(data, start):
    """Batches of a finite `data` repeated forever, from batch position `start` on."""
    yield from data.repeat().skip(start)


def as_task(task):
    """A `Task`, or anything with ``to_task()`` (e.g. `warpkeras.data.ClassificationTask`)."""
    if isinstance(task, Task):
        return task
    if hasattr(task, "to_task"):
        return task.to_task()
    raise TypeError(
        f"Expected a warpkeras.Task (or an object with to_task()), got {type(task).__name__}."
    )


class TaskSampler:
    """A task source drawing tasks from a list, or from a factory ``rng -> Task``.

    Args:
        tasks: a list of `Task` (sampled uniformly with replacement) or a callable
            ``rng -> Task`` (e.g. a sine-regression generator).
        replace: sample a meta-batch from a list with replacement (the papers do).
    """

    def __init__(self, tasks, replace=True):
        replace = _v.check_bool(replace, "replace", where="TaskSampler")
        if isinstance(tasks, Task) or hasattr(tasks, "to_task"):
            tasks = [tasks]
        if not callable(tasks):
            if not isinstance(tasks, collections.abc.Iterable) or isinstance(tasks, str):
                raise TypeError(
                    f"TaskSampler: tasks={_v.describe(tasks)} is not valid: expected a list "
                    "of warpkeras.Task or a callable rng -> Task."
                )
            tasks = [as_task(t) for t in tasks]
            if not tasks:
                raise ValueError("TaskSampler needs at least one task.")
        self.tasks = tasks
        self.replace = replace

    def sample(self, rng, n):
        """Draws `n` tasks.

        Args:
            rng: a `numpy.random.Generator`; passed to the task callable, or drawing from
                the list of tasks.
            n: the number of tasks.

        Returns:
            A list of `n` `Task`s.

        Raises:
            ValueError: more tasks than the list holds, drawn without replacement.
        """
        if callable(self.tasks):
            return [as_task(self.tasks(rng)) for _ in range(n)]
        if not self.replace and n > len(self.tasks):
            raise ValueError(
                f"Cannot draw {n} distinct tasks from {len(self.tasks)} without replacement."
            )
        idx = rng.choice(len(self.tasks), size=n, replace=self.replace)
        return [self.tasks[i] for i in idx]


def as_task_source(source):
    """Anything trainers accept as a task source → an object with ``sample(rng, n)``."""
    if hasattr(source, "sample") and callable(source.sample):
        return source
    if isinstance(source, Task) or hasattr(source, "to_task"):
        return TaskSampler([source])
    if isinstance(source, (list, tuple)) or callable(source):
        return TaskSampler(source)
    if hasattr(source, "__next__") or hasattr(source, "__iter__"):
        return _IteratorSource(iter(source))
    raise TypeError(
        f"Cannot use {type(source).__name__} as a task source: give a list of Task, a "
        "TaskSampler, a callable rng -> Task, or an iterator of Task."
    )


class _IteratorSource:
    def __init__(self, it):
        self.it = it

    def sample(self, rng, n):
        out = []
        for _ in range(n):
            try:
                out.append(as_task(next(self.it)))
            except StopIteration:
                break
        if not out:
            raise StopIteration("The task iterator is exhausted.")
        return out
