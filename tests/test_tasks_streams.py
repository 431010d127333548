"""Batch streams of `tf.data` tasks: meta batches are other batches than the adaptation
batch of the same step, a task's stream is not restarted every meta step, and the batches
replay from (seed, meta step) on resume."""

import keras
import numpy as np
import tensorflow as tf

import warpkeras

N_BATCHES = 10


def _dataset(n=N_BATCHES):
    """n batches of 4 examples; every example of batch i has x = i (its id)."""
    ids = np.repeat(np.arange(n, dtype="float32"), 4)
    x = np.stack([ids, np.ones_like(ids)], axis=1)
    y = (0.1 * ids)[:, None]
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(4)


def _ids(stream, k):
    return [int(np.asarray(next(stream)[0])[0, 0]) for _ in range(k)]


def test_streams_of_a_finite_dataset_are_shifted_and_start_anywhere():
    task = warpkeras.Task(train=_dataset(), name="ds")
    starts = set()
    for s in range(20):
        rng = np.random.default_rng([0, s])
        train, meta = task.streams(*rng.spawn(2))
        t_ids, m_ids = _ids(train, 12), _ids(meta, 12)
        # consecutive batches, repeated after the last one (never cut to the first ones)
        assert t_ids == [(t_ids[0] + k) % N_BATCHES for k in range(12)]
        # the meta batch of every step is another batch
        assert all(a != b for a, b in zip(t_ids, m_ids)), (t_ids, m_ids)
        starts.add(t_ids[0])
        # the same generator replays the same batches
        rng = np.random.default_rng([0, s])
        again_train, again_meta = task.streams(*rng.spawn(2))
        assert _ids(again_train, 3) == t_ids[:3] and _ids(again_meta, 3) == m_ids[:3]
    assert len(starts) >= 6, starts  # starts spread over the dataset, not always batch 0


def test_infinite_dataset_is_read_on_across_calls_not_restarted():
    task = warpkeras.Task(train=_dataset().repeat(), name="endless")
    first = _ids(task.batches("train", np.random.default_rng(0)), 3)
    second = _ids(task.batches("train", np.random.default_rng(1)), 3)
    assert first == [0, 1, 2] and second == [3, 4, 5]
    train, meta = task.streams(*np.random.default_rng(2).spawn(2))
    assert _ids(train, 1) != _ids(meta, 1)


def test_empty_dataset_is_refused_with_the_task_name():
    task = warpkeras.Task(train=_dataset().take(0), name="empty-task")
    try:
        next(task.batches("train", np.random.default_rng(0)))
    except ValueError as e:
        assert "empty-task" in str(e) and "no batches" in str(e)
    else:
        raise AssertionError("an empty dataset was accepted")


def _trainer(seed=0):
    model = keras.Sequential(
        [
            keras.Input((2,)),
            warpkeras.warp(keras.layers.Dense(2, use_bias=False, kernel_initializer="identity")),
            keras.layers.Dense(1, use_bias=False, kernel_initializer="zeros"),
        ]
    )
    trainer = warpkeras.WarpTrainer(
        model,
        "mse",
        mode="online",
        init_objective=None,
        inner_steps=3,
        meta_batch_size=1,
        inner_learning_rate=0.01,
        seed=seed,
    )
    seen = []
    group_step = trainer._group_step

    def spy(carry, x, y, meta_batch):
        seen.append((int(np.asarray(x)[0, 0, 0]), int(np.asarray(meta_batch[0])[0, 0, 0])))
        return group_step(carry, x, y, meta_batch)

    trainer._group_step = spy
    return trainer, seen


def test_online_warp_trainer_on_a_dataset_task_sees_other_meta_batches_and_the_whole_stream():
    task = warpkeras.Task(train=_dataset(), name="ds")
    trainer, seen = _trainer()
    per_step = []
    for s in range(6):
        seen.clear()
        trainer.train_step([task], np.random.default_rng([trainer.seed, s]))
        trainer.step.assign(s + 1)
        per_step.append(list(seen))
    assert all(len(p) == 3 for p in per_step)
    assert all(t != m for p in per_step for t, m in p), per_step
    assert len({t for p in per_step for t, _ in p}) > 3, per_step  # not the first 3 batches
    assert len({p[0][0] for p in per_step}) > 1, per_step  # not restarted each meta step

    # resumed at meta step 4: the same batches as the uninterrupted run
    resumed, seen = _trainer()
    resumed.step.assign(4)
    resumed.train_step([task], np.random.default_rng([resumed.seed, 4]))
    assert seen == per_step[4]
