import numpy as np
import pytest

from warpkeras import ReplayBuffer


def _fill(buf, n):
    for i in range(n):
        buf.add(
            task_id=i % 3,
            step=i,
            theta=[np.full(4, i, "float32")],
            velocity=[np.full(4, -i, "float32")],
        )


def test_unbounded_buffer_returns_every_point_once():
    buf = ReplayBuffer()
    _fill(buf, 10)
    steps = sorted(e["step"] for e in buf.drain(np.random.default_rng(0)))
    assert steps == list(range(10))


def test_reservoir_bounds_memory_and_keeps_a_sample_of_the_stream():
    buf = ReplayBuffer(capacity=5, overflow="reservoir", seed=1)
    _fill(buf, 100)
    assert len(buf) == 5 and buf.seen == 100
    assert buf.nbytes == 5 * 2 * 4 * 4
    steps = [e["step"] for e in buf.drain(np.random.default_rng(0))]
    assert max(steps) > 5  # later points replaced early ones


def test_spill_keeps_every_point_with_bounded_memory(tmp_path):
    buf = ReplayBuffer(capacity=4, overflow="spill", spill_dir=str(tmp_path))
    _fill(buf, 12)
    assert len(buf) == 12 and buf.nbytes == 4 * 2 * 4 * 4
    entries = sorted(buf.drain(np.random.default_rng(0)), key=lambda e: e["step"])
    for i, e in enumerate(entries):
        np.testing.assert_array_equal(e["theta"][0], np.full(4, i, "float32"))
        np.testing.assert_array_equal(e["velocity"][0], np.full(4, -i, "float32"))
    buf.clear()
    assert len(buf) == 0 and not any(
        p.name.startswith("warpkeras-buffer") for p in tmp_path.iterdir()
    )


def test_drain_order_does_not_depend_on_insertion_order():
    a, b = ReplayBuffer(), ReplayBuffer()
    points = [(t, k) for t in range(3) for k in range(4)]
    for t, k in points:
        a.add(t, k, [np.zeros(1)])
    for t, k in sorted(points, key=lambda p: (p[1], p[0])):
        b.add(t, k, [np.zeros(1)])
    order = lambda buf: [(e["task_id"], e["step"]) for e in buf.drain(np.random.default_rng(5))]  # noqa: E731
    assert order(a) == order(b)


def test_bad_arguments():
    with pytest.raises(ValueError, match="overflow"):
        ReplayBuffer(overflow="drop")
    with pytest.raises(ValueError, match="capacity"):
        ReplayBuffer(capacity=0)
