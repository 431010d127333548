"""Synthetic task families: sine regression, continual sine regression, 2-D loss surfaces.

Every target function accepts numpy arrays (returning numpy) or TensorFlow tensors /
variables (returning differentiable tensors). Every sampler takes a seed or a numpy
``Generator`` and is deterministic given it.
"""

import math

import numpy as np
import tensorflow as tf

from warpkeras.data._cache import as_generator, check_float, check_int


def _is_tf(x):
    return tf.is_tensor(x) or isinstance(x, tf.Variable)


def _sigmoid(z):
    if _is_tf(z):
        return tf.sigmoid(z)
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def _sin(z):
    return tf.sin(z) if _is_tf(z) else np.sin(z)


def _exp(z):
    return tf.exp(z) if _is_tf(z) else np.exp(z)


def _prepare(x):
    if _is_tf(x):
        x = tf.convert_to_tensor(x)
        if not x.dtype.is_floating:
            x = tf.cast(x, tf.float32)
        return x
    x = np.asarray(x)
    if x.dtype.kind != "f":
        x = x.astype(np.float64)
    return x


def _check_range(name, pair):
    """A ``(low, high)`` pair of finite numbers with ``low <= high``, as floats."""
    if isinstance(pair, (str, bytes)) or not np.iterable(pair) or len(pair) != 2:
        raise ValueError(f"{name} must be a (low, high) pair of numbers, got {pair!r}")
    low = check_float(name, pair[0], hint="its low end")
    high = check_float(name, pair[1], hint="its high end")
    if not high >= low:
        raise ValueError(f"{name} must satisfy low <= high, got ({low}, {high}); swap them")
    return low, high


def _uniform_tf_dataset(fn, low, high, batch_size, seed):
    """Endless tf.data stream of (x, fn(x)) batches, x ~ U(low, high), shape (batch, 1)."""
    key = int(np.random.SeedSequence(seed).generate_state(1, dtype=np.uint32)[0])

    def make(step):
        u = tf.random.stateless_uniform(
            [batch_size, 1], seed=tf.stack([tf.constant(key, tf.int64), step])
        )
        x = low + (high - low) * u
        return x, tf.cast(fn(x), tf.float32)

    return tf.data.Dataset.counter().map(make).prefetch(tf.data.AUTOTUNE)


# ----------------------------------------------------------------------------------------
# sine regression


class _TaskDistribution:
    """Base of the task distributions: ``sample(rng)`` draws one task; this adds batches."""

    def sample(self, rng=None):  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    def sample_tasks(self, num_tasks, rng=None):
        """Draw a list of ``num_tasks`` tasks from one generator.

        Args:
            num_tasks: number of tasks.
            rng: numpy ``Generator`` or int seed.

        Returns:
            list of tasks, each drawn as by ``sample``.

        Example:
            >>> batch = SineTaskDistribution().sample_tasks(5, rng=0)
        """
        rng = as_generator(rng)
        num_tasks = check_int("num_tasks", num_tasks, minimum=0)
        return [self.sample(rng) for _ in range(num_tasks)]


class SineTask:
    """One sine regression task ``y = A sin(x - phase)``.

    Args:
        amplitude: ``A``.
        phase: phase shift.
        x_range: ``(low, high)`` of the input distribution.

    Example:
        >>> task = SineTask(amplitude=2.0, phase=0.5)
        >>> x, y = task.sample(10, rng=0)
        >>> x.shape, y.shape
        ((10, 1), (10, 1))
    """

    def __init__(self, amplitude, phase, x_range=(-5.0, 5.0)):
        self.amplitude = check_float("amplitude", amplitude)
        self.phase = check_float("phase", phase)
        self.x_range = _check_range("x_range", x_range)

    def __call__(self, x):
        """Evaluate the target ``A sin(x - phase)``.

        Args:
            x: numpy array (result is numpy) or tf tensor/variable (result is a tensor).

        Returns:
            Targets with the shape of ``x``.

        Example:
            >>> SineTask(2.0, 0.0)(np.array([np.pi / 2]))
            array([2.])
        """
        x = _prepare(x)
        return self.amplitude * _sin(x - self.phase)

    def sample(self, num_points, rng=None):
        """Draw ``num_points`` inputs uniformly from ``x_range`` and their targets.

        Args:
            num_points: number of points.
            rng: numpy ``Generator`` or int seed.

        Returns:
            ``(x, y)`` float32 arrays of shape ``(num_points, 1)``.

        Example:
            >>> x, y = SineTask(1.0, 0.0).sample(5, rng=1)
        """
        rng = as_generator(rng)
        num_points = check_int("num_points", num_points, minimum=0)
        x = rng.uniform(self.x_range[0], self.x_range[1], size=(num_points, 1))
        return x.astype(np.float32), self(x).astype(np.float32)

    def dataset(self, batch_size, seed=None):
        """An endless tf.data stream of ``(x, y)`` batches of shape ``(batch_size, 1)``.

        Args:
            batch_size: points per batch.
            seed: integer seed (``None``: fresh randomness).

        Returns:
            A ``tf.data.Dataset``.

        Example:
            >>> x, y = next(iter(SineTask(1.0, 0.0).dataset(10, seed=0)))
        """
        batch_size = check_int("batch_size", batch_size, minimum=1, hint="points per batch")
        return _uniform_tf_dataset(self, self.x_range[0], self.x_range[1], batch_size, seed)

    def __repr__(self):
        return f"SineTask(amplitude={self.amplitude:.4g}, phase={self.phase:.4g})"


class SineTaskDistribution(_TaskDistribution):
    """The sine regression task distribution of MAML (Finn et al., 2017).

    Amplitude ``~ U[0.1, 5.0]``, phase ``~ U[0, pi]``, inputs ``~ U[-5, 5]``.

    Args:
        amplitude_range: ``(low, high)`` amplitudes.
        phase_range: ``(low, high)`` phases.
        x_range: ``(low, high)`` inputs.

    Example:
        >>> dist = SineTaskDistribution()
        >>> tasks = dist.sample_tasks(4, rng=0)
        >>> x, y = tasks[0].sample(10, rng=1)
    """

    def __init__(self, amplitude_range=(0.1, 5.0), phase_range=(0.0, math.pi), x_range=(-5.0, 5.0)):
        self.amplitude_range = _check_range("amplitude_range", amplitude_range)
        self.phase_range = _check_range("phase_range", phase_range)
        self.x_range = _check_range("x_range", x_range)

    def sample(self, rng=None):
        """Draw one :class:`SineTask`.

        Args:
            rng: numpy ``Generator`` or int seed.

        Returns:
            A :class:`SineTask`.

        Example:
            >>> task = SineTaskDistribution().sample(rng=0)
        """
        rng = as_generator(rng)
        amplitude = rng.uniform(*self.amplitude_range)
        phase = rng.uniform(*self.phase_range)
        return SineTask(amplitude, phase, self.x_range)


# ----------------------------------------------------------------------------------------
# continual sine regression


class ContinualSineTask:
    """A continual-learning sine task: a gated mixture of two sines over consecutive sub-intervals.

    ``f(x) = s(x) a1 sin(x - b1) + (1 - s(x)) a2 sin(x - b2)``, ``s(x) = sigmoid(x + o)``.
    The input interval is split evenly into ``num_subtasks`` consecutive sub-intervals
    (sub-task ``t`` covers the ``t``-th from the left); a learner sees them one at a time.

    Args:
        a1: amplitude of the first sine.
        b1: phase of the first sine.
        a2: amplitude of the second sine.
        b2: phase of the second sine.
        offset: gate offset ``o``.
        num_subtasks: number of sub-intervals (5 in the protocol).
        x_range: the full input interval.

    Example:
        >>> task = ContinualSineTask(1.0, 0.0, 2.0, 1.0, offset=0.5)
        >>> xs, ys, ids = task.training_batches(rng=0)   # 5 sub-tasks x 20 steps of 5 points
        >>> xs.shape, ids[:3]
        ((100, 5, 1), array([0, 0, 0], dtype=int32))
    """

    def __init__(self, a1, b1, a2, b2, offset, num_subtasks=5, x_range=(-5.0, 5.0)):
        self.a1, self.b1 = check_float("a1", a1), check_float("b1", b1)
        self.a2, self.b2 = check_float("a2", a2), check_float("b2", b2)
        self.offset = check_float("offset", offset)
        self.num_subtasks = check_int("num_subtasks", num_subtasks, minimum=1)
        self.x_range = _check_range("x_range", x_range)

    @property
    def params(self):
        """The task parameters ``(a1, b1, a2, b2, offset)``."""
        return (self.a1, self.b1, self.a2, self.b2, self.offset)

    def __call__(self, x):
        """Evaluate the target ``f(x)``.

        Args:
            x: numpy array (result is numpy) or tf tensor/variable (result is a tensor).

        Returns:
            Targets with the shape of ``x``.

        Example:
            >>> float(ContinualSineTask(2.0, 0.0, 1.0, np.pi / 2, 0.0)(np.array(0.0)))
            -0.5
        """
        x = _prepare(x)
        gate = _sigmoid(x + self.offset)
        return gate * self.a1 * _sin(x - self.b1) + (1.0 - gate) * self.a2 * _sin(x - self.b2)

    @property
    def intervals(self):
        """List of ``(low, high)`` sub-intervals, left to right."""
        edges = np.linspace(self.x_range[0], self.x_range[1], self.num_subtasks + 1)
        return [(float(edges[i]), float(edges[i + 1])) for i in range(self.num_subtasks)]

    def _check_subtask(self, index):
        index = int(index)
        if not 0 <= index < self.num_subtasks:
            raise IndexError(f"sub-task index must be in [0, {self.num_subtasks}), got {index}")
        return index

    def sample_subtask(self, index, num_points, rng=None):
        """Draw ``num_points`` inputs uniformly from sub-interval ``index`` and their targets.

        Args:
            index: sub-task (interval) index, 0 = leftmost.
            num_points: number of points.
            rng: numpy ``Generator`` or int seed.

        Returns:
            ``(x, y)`` float32 arrays of shape ``(num_points, 1)``.

        Example:
            >>> x, y = task.sample_subtask(0, 5, rng=0)   # doctest: +SKIP
        """
        low, high = self.intervals[self._check_subtask(index)]
        rng = as_generator(rng)
        num_points = check_int("num_points", num_points, minimum=0)
        x = rng.uniform(low, high, size=(num_points, 1))
        return x.astype(np.float32), self(x).astype(np.float32)

    def _order(self, order):
        if order is None:
            return list(range(self.num_subtasks))
        order = [self._check_subtask(i) for i in order]
        if sorted(order) != list(range(self.num_subtasks)):
            raise ValueError(
                f"order must be a permutation of 0..{self.num_subtasks - 1}, got {order}"
            )
        return order

    def training_batches(self, rng=None, steps_per_subtask=20, batch_size=5, order=None):
        """The online training stream: ``steps_per_subtask`` batches per sub-task, in order.

        Args:
            rng: numpy ``Generator`` or int seed.
            steps_per_subtask: adaptation steps on each sub-task (``n = 20``).
            batch_size: points per batch (5).
            order: order of sub-tasks (a permutation of ``range(num_subtasks)``);
                ``None`` is left to right.

        Returns:
            ``(x, y, subtask)``: float32 ``(K, batch_size, 1)`` inputs and targets with
            ``K = num_subtasks * steps_per_subtask``, and int32 ``(K,)`` sub-task ids.

        Example:
            >>> xs, ys, ids = task.training_batches(rng=0, order=[1, 3, 4, 2, 0])   # doctest: +SKIP
        """
        rng = as_generator(rng)
        steps = check_int("steps_per_subtask", steps_per_subtask, minimum=1)
        batch = check_int("batch_size", batch_size, minimum=1, hint="points per batch")
        xs, ys, ids = [], [], []
        for index in self._order(order):
            for _ in range(steps):
                x, y = self.sample_subtask(index, batch, rng)
                xs.append(x)
                ys.append(y)
                ids.append(index)
        return np.stack(xs), np.stack(ys), np.asarray(ids, dtype=np.int32)

    def validation_data(self, num_points=100, rng=None):
        """Held-out points for every sub-task (for the incremental meta-objective).

        Args:
            num_points: points per sub-task.
            rng: numpy ``Generator`` or int seed.

        Returns:
            ``(x, y)`` float32 arrays of shape ``(num_subtasks, num_points, 1)``; row ``t``
            belongs to sub-interval ``t``.

        Example:
            >>> xv, yv = task.validation_data(50, rng=1)   # doctest: +SKIP
        """
        rng = as_generator(rng)
        pairs = [self.sample_subtask(t, num_points, rng) for t in range(self.num_subtasks)]
        return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])

    def train_dataset(self, seed=None, steps_per_subtask=20, batch_size=5, order=None):
        """:meth:`training_batches` as a tf.data pipeline of ``(x, y, subtask)`` elements.

        Args:
            seed: integer seed.
            steps_per_subtask: adaptation steps per sub-task.
            batch_size: points per batch.
            order: order of sub-tasks.

        Returns:
            A finite ``tf.data.Dataset`` with ``num_subtasks * steps_per_subtask`` elements.

        Example:
            >>> for x, y, t in task.train_dataset(seed=0): ...   # doctest: +SKIP
        """
        arrays = self.training_batches(seed, steps_per_subtask, batch_size, order)
        return tf.data.Dataset.from_tensor_slices(arrays)

    def __repr__(self):
        return (
            f"ContinualSineTask(a1={self.a1:.3g}, b1={self.b1:.3g}, a2={self.a2:.3g}, "
            f"b2={self.b2:.3g}, offset={self.offset:.3g}, num_subtasks={self.num_subtasks})"
        )


class ContinualSineDistribution(_TaskDistribution):
    """Distribution over :class:`ContinualSineTask`.

    ``a_i ~ U[0.1, 5]``, ``b_i ~ U[0, pi]``, ``o ~ U[-5, 5]``.

    Args:
        amplitude_range: range of ``a1, a2``.
        phase_range: range of ``b1, b2``.
        offset_range: range of the gate offset ``o``.
        num_subtasks: sub-intervals per task.
        x_range: the full input interval.

    Example:
        >>> dist = ContinualSineDistribution()
        >>> task = dist.sample(rng=0)
        >>> xs, ys, ids = task.training_batches(rng=1)
    """

    def __init__(
        self,
        amplitude_range=(0.1, 5.0),
        phase_range=(0.0, math.pi),
        offset_range=(-5.0, 5.0),
        num_subtasks=5,
        x_range=(-5.0, 5.0),
    ):
        self.amplitude_range = _check_range("amplitude_range", amplitude_range)
        self.phase_range = _check_range("phase_range", phase_range)
        self.offset_range = _check_range("offset_range", offset_range)
        self.num_subtasks = check_int("num_subtasks", num_subtasks, minimum=1)
        self.x_range = _check_range("x_range", x_range)

    def sample(self, rng=None):
        """Draw one :class:`ContinualSineTask`.

        Args:
            rng: numpy ``Generator`` or int seed.

        Returns:
            A :class:`ContinualSineTask`.

        Example:
            >>> task = ContinualSineDistribution().sample(rng=3)
        """
        rng = as_generator(rng)
        a1 = rng.uniform(*self.amplitude_range)
        b1 = rng.uniform(*self.phase_range)
        a2 = rng.uniform(*self.amplitude_range)
        b2 = rng.uniform(*self.phase_range)
        offset = rng.uniform(*self.offset_range)
        return ContinualSineTask(a1, b1, a2, b2, offset, self.num_subtasks, self.x_range)


# ----------------------------------------------------------------------------------------
# 2-D loss surfaces


_SURFACE_VARIANTS = ("paper", "peaks")


class LossSurface:
    """A random 2-D loss surface (WarpGrad, Appendix E).

    ``f(x1, x2) = b1 (a1 - x1)^2 exp(-x1^2 - (x2 + a2)^2)
    - b2 (x1 / s - x1^3 - x2^3) exp(-x1^2 - x2^2)
    - b3 exp(-(x1 + a3)^2 - x1^2)``.

    The last term depends on ``x1`` only, as printed in the paper. With
    ``variant="peaks"`` it is ``- b3 exp(-(x1 + a3)^2 - x2^2)`` instead, as in the
    classic "peaks" function this family is modelled on.

    The "model" of such a task is the point ``x = (x1, x2)`` itself; calling the
    surface on a ``tf.Variable`` of shape ``(2,)`` gives a differentiable loss.

    Args:
        s: scale, an integer in ``1..10``.
        a: ``(a1, a2, a3)`` shifts, each in ``{-1, 0, 1}``.
        b: ``(b1, b2, b3)`` weights, each in ``{-5, ..., 5}``.
        variant: ``"paper"`` (default) or ``"peaks"``.

    Example:
        >>> import tensorflow as tf
        >>> surface = LossSurface(s=2, a=(1, 0, -1), b=(3, -2, 1))
        >>> point = tf.Variable([0.5, -1.0])
        >>> with tf.GradientTape() as tape:
        ...     loss = surface(point)
        >>> grad = tape.gradient(loss, point)   # shape (2,)
    """

    def __init__(self, s, a, b, variant="paper"):
        if variant not in _SURFACE_VARIANTS:
            raise ValueError(f"variant must be one of {_SURFACE_VARIANTS}, got {variant!r}")
        self.s = check_float("s", s)
        if self.s == 0:
            raise ValueError("s must be non-zero (it divides x1)")
        for name, value in (("a", a), ("b", b)):
            if isinstance(value, (str, bytes)) or not np.iterable(value) or len(value) != 3:
                raise ValueError(f"{name} must have 3 entries, got {value!r}")
        self.a = tuple(check_float("a", v) for v in a)
        self.b = tuple(check_float("b", v) for v in b)
        self.variant = variant

    def __call__(self, x):
        """Evaluate the surface at points.

        Args:
            x: points of shape ``(..., 2)``: numpy array (result is numpy) or tf
                tensor/variable (result is a differentiable tensor).

        Returns:
            Loss values of shape ``(...)``.

        Example:
            >>> surface = LossSurface(2, (1, 0, -1), (3, -2, 1))
            >>> float(surface(np.array([0.0, 1.0])))  # doctest: +ELLIPSIS
            0.0...
        """
        x = _prepare(x)
        if x.shape[-1] != 2:
            raise ValueError(f"points must have a last dimension of 2, got shape {x.shape}")
        x1, x2 = x[..., 0], x[..., 1]
        a1, a2, a3 = self.a
        b1, b2, b3 = self.b
        term1 = b1 * (a1 - x1) ** 2 * _exp(-(x1**2) - (x2 + a2) ** 2)
        term2 = b2 * (x1 / self.s - x1**3 - x2**3) * _exp(-(x1**2) - x2**2)
        last = x1 if self.variant == "paper" else x2
        term3 = b3 * _exp(-((x1 + a3) ** 2) - last**2)
        return term1 - term2 - term3

    def grid(self, limits=(-3.0, 3.0), num=101):
        """Evaluate the surface on a square grid (for plotting).

        Args:
            limits: ``(low, high)`` for both coordinates.
            num: grid points per axis.

        Returns:
            ``(x1, x2, z)`` arrays of shape ``(num, num)`` (``x1`` varies along columns).

        Example:
            >>> x1, x2, z = LossSurface(1, (0, 0, 0), (1, 1, 1)).grid(num=5)
            >>> z.shape
            (5, 5)
        """
        limits = _check_range("limits", limits)
        num = check_int("num", num, minimum=1, hint="grid points per axis")
        axis = np.linspace(limits[0], limits[1], num)
        x1, x2 = np.meshgrid(axis, axis)
        return x1, x2, self(np.stack([x1, x2], axis=-1))

    def __repr__(self):
        return f"LossSurface(s={self.s:g}, a={self.a}, b={self.b}, variant={self.variant!r})"


class LossSurfaceDistribution(_TaskDistribution):
    """Distribution over :class:`LossSurface`.

    ``s ~ Cat(1..10)``, ``a_i ~ Cat(-1, 0, 1)``, ``b_i ~ Cat(-5..5)``.

    Starting points are ``x ~ U(-3, 3)^2``.

    Args:
        s_values: values ``s`` is drawn from (uniformly).
        a_values: values each ``a_i`` is drawn from.
        b_values: values each ``b_i`` is drawn from.
        init_range: ``(low, high)`` of each starting coordinate.
        variant: passed to :class:`LossSurface`.

    Example:
        >>> dist = LossSurfaceDistribution()
        >>> surface = dist.sample(rng=0)
        >>> starts = dist.sample_initial_points(10, rng=1)   # (10, 2) float32
    """

    def __init__(
        self,
        s_values=tuple(range(1, 11)),
        a_values=(-1, 0, 1),
        b_values=tuple(range(-5, 6)),
        init_range=(-3.0, 3.0),
        variant="paper",
    ):
        for name, values in (
            ("s_values", s_values),
            ("a_values", a_values),
            ("b_values", b_values),
        ):
            if isinstance(values, (str, bytes)) or not np.iterable(values) or not len(values):
                raise ValueError(f"{name} must be a non-empty sequence of numbers, got {values!r}")
            for v in values:
                check_float(name, v)
        self.s_values = np.asarray(s_values)
        self.a_values = np.asarray(a_values)
        self.b_values = np.asarray(b_values)
        if 0 in self.s_values:
            raise ValueError("s_values must not contain 0 (s divides x1)")
        self.init_range = _check_range("init_range", init_range)
        if variant not in _SURFACE_VARIANTS:
            raise ValueError(f"variant must be one of {_SURFACE_VARIANTS}, got {variant!r}")
        self.variant = variant

    def sample(self, rng=None):
        """Draw one :class:`LossSurface`.

        Args:
            rng: numpy ``Generator`` or int seed.

        Returns:
            A :class:`LossSurface`.

        Example:
            >>> surface = LossSurfaceDistribution().sample(rng=2)
        """
        rng = as_generator(rng)
        s = rng.choice(self.s_values)
        a = rng.choice(self.a_values, size=3)
        b = rng.choice(self.b_values, size=3)
        return LossSurface(s, a, b, self.variant)

    def sample_initial_points(self, num_points, rng=None):
        """Draw starting points uniformly from ``init_range^2``.

        Args:
            num_points: number of points.
            rng: numpy ``Generator`` or int seed.

        Returns:
            float32 array ``(num_points, 2)``.

        Example:
            >>> x0 = LossSurfaceDistribution().sample_initial_points(10, rng=0)
        """
        rng = as_generator(rng)
        num_points = check_int("num_points", num_points, minimum=0)
        return rng.uniform(*self.init_range, size=(num_points, 2)).astype(np.float32)
