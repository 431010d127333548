"""Sine, continual sine and 2-D loss-surface task families."""

import math

import numpy as np
import pytest
import tensorflow as tf

from warpkeras.data import (
    ContinualSineDistribution,
    ContinualSineTask,
    LossSurface,
    LossSurfaceDistribution,
    SineTask,
    SineTaskDistribution,
)


def test_sine_task_formula_and_sampling():
    task = SineTask(amplitude=2.0, phase=0.5)
    assert task(np.array([0.5]))[0] == pytest.approx(0.0)
    assert task(np.array([0.5 + math.pi / 2]))[0] == pytest.approx(2.0)
    x, y = task.sample(50, rng=0)
    assert x.shape == y.shape == (50, 1) and x.dtype == np.float32
    assert x.min() >= -5 and x.max() <= 5
    np.testing.assert_allclose(y, 2.0 * np.sin(x - 0.5), rtol=1e-5, atol=1e-6)
    xb, yb = next(iter(task.dataset(8, seed=1)))
    np.testing.assert_allclose(yb.numpy(), 2.0 * np.sin(xb.numpy() - 0.5), rtol=1e-5, atol=1e-5)
    xb2, _ = next(iter(task.dataset(8, seed=1)))
    np.testing.assert_array_equal(xb.numpy(), xb2.numpy())


def test_sine_distribution_ranges_and_determinism():
    dist = SineTaskDistribution()
    tasks = dist.sample_tasks(300, rng=0)
    amps = np.array([t.amplitude for t in tasks])
    phases = np.array([t.phase for t in tasks])
    assert amps.min() >= 0.1 and amps.max() <= 5.0 and amps.max() - amps.min() > 4.0
    assert phases.min() >= 0.0 and phases.max() <= math.pi
    again = dist.sample_tasks(300, rng=0)
    assert [t.amplitude for t in again] == amps.tolist()


def _sigmoid(z):
    return 1.0 / (1.0 + math.exp(-z))


def test_continual_sine_formula_at_hand_points():
    task = ContinualSineTask(a1=2.0, b1=0.0, a2=1.0, b2=math.pi / 2, offset=0.0)
    # x = 0: gate 0.5, f1 = 2 sin(0) = 0, f2 = sin(-pi/2) = -1  ->  -0.5
    assert task(np.array(0.0)) == pytest.approx(-0.5)
    # x = pi/2: f1 = 2, f2 = sin(0) = 0  ->  2 * sigmoid(pi/2)
    assert task(np.array(math.pi / 2)) == pytest.approx(2.0 * _sigmoid(math.pi / 2))
    other = ContinualSineTask(a1=1.0, b1=1.0, a2=3.0, b2=2.0, offset=-2.0)
    x = 1.5
    gate = _sigmoid(x - 2.0)
    expected = gate * math.sin(x - 1.0) + (1 - gate) * 3.0 * math.sin(x - 2.0)
    assert other(np.array(x)) == pytest.approx(expected)
    tf_value = other(tf.constant([x]))
    assert float(tf_value[0]) == pytest.approx(expected, rel=1e-5)
    # far to the right the gate is open: f ~ f1; far to the left: f ~ f2
    assert other(np.array(30.0)) == pytest.approx(math.sin(29.0), abs=1e-6)
    assert other(np.array(-30.0)) == pytest.approx(3.0 * math.sin(-32.0), abs=1e-6)


def test_continual_sine_subtasks_and_stream():
    task = ContinualSineDistribution().sample(rng=4)
    assert task.intervals == [(-5.0, -3.0), (-3.0, -1.0), (-1.0, 1.0), (1.0, 3.0), (3.0, 5.0)]
    xs, ys, ids = task.training_batches(rng=0)
    assert xs.shape == ys.shape == (100, 5, 1)
    assert ids.tolist() == [t for t in range(5) for _ in range(20)]
    for k in range(100):
        low, high = task.intervals[ids[k]]
        assert xs[k].min() >= low and xs[k].max() <= high
    np.testing.assert_allclose(ys, task(xs.astype(np.float64)), rtol=1e-5, atol=1e-5)
    order = [1, 3, 4, 2, 0]
    _, _, ids2 = task.training_batches(rng=0, order=order, steps_per_subtask=2, batch_size=3)
    assert ids2.tolist() == [1, 1, 3, 3, 4, 4, 2, 2, 0, 0]
    with pytest.raises(ValueError, match="permutation"):
        task.training_batches(order=[0, 0, 1, 2, 3])
    xv, yv = task.validation_data(40, rng=1)
    assert xv.shape == (5, 40, 1)
    for t, (low, high) in enumerate(task.intervals):
        assert xv[t].min() >= low and xv[t].max() <= high
    again = task.training_batches(rng=0)
    np.testing.assert_array_equal(again[0], xs)
    elements = list(task.train_dataset(seed=0))
    assert len(elements) == 100
    np.testing.assert_array_equal(elements[0][0].numpy(), xs[0])


def test_continual_sine_parameter_ranges():
    tasks = ContinualSineDistribution().sample_tasks(300, rng=0)
    params = np.array([t.params for t in tasks])
    for col in (0, 2):
        assert params[:, col].min() >= 0.1 and params[:, col].max() <= 5.0
    for col in (1, 3):
        assert params[:, col].min() >= 0.0 and params[:, col].max() <= math.pi
    assert params[:, 4].min() >= -5.0 and params[:, 4].max() <= 5.0
    assert params[:, 4].min() < -4.0 and params[:, 4].max() > 4.0


def test_loss_surface_formula_at_hand_points():
    surface = LossSurface(s=2, a=(1, 0, -1), b=(3, -2, 1))
    e1, e2 = math.exp(-1), math.exp(-2)
    # (0, 0): 3 * 1 * 1 - (-2) * 0 - exp(-1)
    assert surface(np.array([0.0, 0.0])) == pytest.approx(3.0 - e1)
    # (1, -1): first term 0; second: -(-2)(0.5 - 1 + 1) e^-2 = e^-2; last: exp(-0 - 1)
    assert surface(np.array([1.0, -1.0])) == pytest.approx(e2 - e1)
    # (0, 1): 3 e^-1 - (-2)(-1) e^-1 - exp(-(0 - 1)^2 - 0^2) = 0  (last term uses x1 only)
    assert surface(np.array([0.0, 1.0])) == pytest.approx(0.0, abs=1e-12)
    peaks = LossSurface(s=2, a=(1, 0, -1), b=(3, -2, 1), variant="peaks")
    assert peaks(np.array([0.0, 1.0])) == pytest.approx(e1 - e2)
    batch = surface(np.array([[0.0, 0.0], [1.0, -1.0]]))
    assert batch.shape == (2,)
    with pytest.raises(ValueError, match="last dimension of 2"):
        surface(np.zeros(3))


def test_loss_surface_is_differentiable_in_tf():
    surface = LossSurface(s=3, a=(-1, 1, 0), b=(-4, 5, 2))
    point = tf.Variable([0.3, -0.7], dtype=tf.float64)
    with tf.GradientTape() as tape:
        loss = surface(point)
    grad = tape.gradient(loss, point).numpy()
    assert float(loss) == pytest.approx(float(surface(np.array([0.3, -0.7]))))
    eps = 1e-6
    numeric = [
        (surface(np.array([0.3 + eps, -0.7])) - surface(np.array([0.3 - eps, -0.7]))) / (2 * eps),
        (surface(np.array([0.3, -0.7 + eps])) - surface(np.array([0.3, -0.7 - eps]))) / (2 * eps),
    ]
    np.testing.assert_allclose(grad, numeric, rtol=1e-5, atol=1e-8)
    x1, x2, z = surface.grid(num=7)
    assert z.shape == (7, 7)
    assert z[3, 6] == pytest.approx(float(surface(np.array([3.0, 0.0]))))


def test_loss_surface_sampling_ranges():
    dist = LossSurfaceDistribution()
    rng = np.random.default_rng(0)
    surfaces = [dist.sample(rng) for _ in range(400)]
    s = np.array([x.s for x in surfaces])
    a = np.array([x.a for x in surfaces])
    b = np.array([x.b for x in surfaces])
    assert set(s.tolist()) == set(range(1, 11))
    assert set(a.ravel().tolist()) == {-1, 0, 1}
    assert set(b.ravel().tolist()) == set(range(-5, 6))
    starts = dist.sample_initial_points(500, rng=1)
    assert starts.shape == (500, 2) and starts.min() >= -3 and starts.max() <= 3
    assert starts.min() < -2.9 and starts.max() > 2.9
    assert dist.sample(rng=5).a == dist.sample(rng=5).a
    np.testing.assert_array_equal(
        dist.sample_initial_points(3, rng=2), dist.sample_initial_points(3, rng=2)
    )
