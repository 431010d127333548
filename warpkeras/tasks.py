"""Tasks: what a meta-learner adapts to.

A `Task` supplies

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

import numpy as np
import tensorflow as tf


def _is_arrays(data):
    return isinstance(data, (tuple, list)) and len(data) == 2 and hasattr(data[0], "shape")


class Task:
    """One task: data for adaptation, for the meta-objective and for evaluation.

    Args:
        train: adaptation data: a pair of arrays ``(x, y)`` (mini-batches are drawn from it
            by the trainer's generator, reshuffled every epoch), a `tf.data.Dataset` of
            ``(x, y)`` batches (repeated forever), or a callable ``rng -> iterator`` of
            batches.
        meta: data for the meta-objective, in any of the same forms. `None` draws other
            mini-batches of `train` (WarpGrad App. F evaluates L_meta and L_task on
            different batches of the same task data).
        test: held-out ``(x, y)`` arrays or a finite `tf.data.Dataset`, for evaluation.
        batch_size: mini-batch size when `train` / `meta` are arrays.
        augment: optional ``augment(x, rng) -> x`` applied to adaptation batches drawn from
            arrays (e.g. random affine transforms of images).
        name: display name.
        info: free-form dict (e.g. the generating parameters of a synthetic task).
    """

    def __init__(self, train, meta=None, test=None, batch_size=32, augment=None,
                 name=None, info=None):
        self._check(train, "train")
        if meta is not None:
            self._check(meta, "meta")
        self.train = train
        self.meta = meta
        self.test = test
        self.batch_size = int(batch_size)
        self.augment = augment
        self.name = name or "task"
        self.info = dict(info or {})
        if _is_arrays(train) and len(train[0]) != len(train[1]):
            raise ValueError(
                f"Task '{self.name}': x and y of `train` differ in length "
                f"({len(train[0])} vs {len(train[1])})."
            )

    @staticmethod
    def _check(data, what):
        if not (_is_arrays(data) or isinstance(data, tf.data.Dataset) or callable(data)):
            raise TypeError(
                f"Task `{what}` must be (x, y) arrays, a tf.data.Dataset or a callable "
                f"rng -> iterator; got {type(data).__name__}."
            )

    def batches(self, which="train", rng=None):
        """An endless iterator of ``(x, y)`` batches of adaptation (`"train"`) or meta
        (`"meta"`) data.

        Args:
            which: ``"train"`` or ``"meta"``.
            rng: a `numpy.random.Generator` (draws the mini-batches from arrays).
        """
        rng = rng if rng is not None else np.random.default_rng()
        data = self.train if which == "train" or self.meta is None else self.meta
        augment = self.augment if which == "train" else None
        if _is_arrays(data):
            return _array_batches(data, self.batch_size, rng, augment)
        if isinstance(data, tf.data.Dataset):
            return iter(data.repeat())
        return iter(data(rng))

    def test_data(self):
        """Held-out ``(x, y)`` as arrays (concatenating a dataset), or `None`."""
        if self.test is None:
            return None
        if _is_arrays(self.test):
            return self.test
        xs, ys = [], []
        for x, y in self.test:
            xs.append(np.asarray(x))
            ys.append(np.asarray(y))
        return np.concatenate(xs), np.concatenate(ys)

    def __repr__(self):
        return f"<Task '{self.name}'>"


def _array_batches(data, batch_size, rng, augment):
    x, y = data
    n = len(x)
    if n == 0:
        raise ValueError("A task has no training examples.")
    batch_size = min(batch_size, n)
    while True:
        order = rng.permutation(n)
        for start in range(0, n - batch_size + 1, batch_size):
            idx = order[start : start + batch_size]
            xb = x[idx]
            if augment is not None:
                xb = augment(xb, rng)
            yield xb, y[idx]


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
        if not callable(tasks):
            tasks = [as_task(t) for t in tasks]
            if not tasks:
                raise ValueError("TaskSampler needs at least one task.")
        self.tasks = tasks
        self.replace = replace

    def sample(self, rng, n):
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
