"""ClassificationTask pipelines and the affine augmentation."""

import numpy as np
import pytest
import tensorflow as tf

from warpkeras.data import ClassificationTask, affine_transform, random_affine


def _toy_task(n=23, augmentation=None):
    x = np.arange(n, dtype=np.float32).reshape(n, 1)
    y = np.arange(n) % 4
    return ClassificationTask(x, y, x[:5] + 100, y[:5], name="toy", augmentation=augmentation)


def test_one_epoch_visits_every_example_once():
    task = _toy_task()
    seen = np.concatenate([x.numpy()[:, 0] for x, _ in task.train_dataset(5, seed=0, repeat=False)])
    assert sorted(seen.tolist()) == list(range(23))
    assert seen.tolist() != list(range(23))  # shuffled
    ordered = np.concatenate(
        [x.numpy()[:, 0] for x, _ in task.train_dataset(5, shuffle=False, repeat=False)]
    )
    assert ordered.tolist() == list(range(23))


def test_repeat_gives_full_batches_and_fresh_epochs():
    task = _toy_task()
    batches = [x.numpy()[:, 0] for x, _ in task.train_dataset(23, seed=1).take(3)]
    assert all(len(b) == 23 for b in batches)
    assert all(sorted(b.tolist()) == list(range(23)) for b in batches)
    assert batches[0].tolist() != batches[1].tolist()
    same = [x.numpy()[:, 0] for x, _ in task.train_dataset(23, seed=1).take(3)]
    assert [b.tolist() for b in same] == [b.tolist() for b in batches]


def test_labels_travel_with_inputs_and_test_dataset():
    task = _toy_task()
    for x, y in task.train_dataset(7, seed=3).take(4):
        np.testing.assert_array_equal(y.numpy(), x.numpy()[:, 0].astype(int) % 4)
    batches = list(task.test_dataset(batch_size=2))
    assert [len(b[0]) for b in batches] == [2, 2, 1]
    assert task.num_classes == 4 and task.input_shape == (1,)


def test_validation_errors():
    with pytest.raises(ValueError, match="labels must lie"):
        ClassificationTask(np.zeros((3, 2)), [0, 1, 5], np.zeros((0, 2)), [], num_classes=3)
    with pytest.raises(ValueError, match="rows"):
        ClassificationTask(np.zeros((3, 2)), [0, 1], np.zeros((0, 2)), [])
    with pytest.raises(ValueError, match="no augmentation"):
        _toy_task().train_dataset(4, augment=True)


def test_identity_and_rotation_transforms_are_exact():
    rng = np.random.default_rng(0)
    images = rng.random((3, 9, 9, 1)).astype(np.float32)
    same = affine_transform(images, scale=1.0, angle=0.0, translation=[0.0, 0.0])
    np.testing.assert_allclose(same.numpy(), images, atol=1e-6)
    rotated = affine_transform(images, scale=1.0, angle=90.0, translation=[0.0, 0.0])
    np.testing.assert_allclose(rotated.numpy(), np.rot90(images, k=1, axes=(1, 2)), atol=1e-5)
    shifted = affine_transform(images, scale=1.0, angle=0.0, translation=[2.0, 1.0])
    np.testing.assert_allclose(shifted.numpy()[:, 1:, 2:], images[:, :-1, :-2], atol=1e-6)
    assert np.all(shifted.numpy()[:, 0] == 0.0) and np.all(shifted.numpy()[:, :, :2] == 0.0)


def test_scaling_enlarges_about_centre():
    image = np.zeros((1, 21, 21, 1), np.float32)
    image[0, 8:13, 8:13] = 1.0
    bigger = affine_transform(image, scale=2.0, angle=0.0, translation=[0.0, 0.0]).numpy()
    assert bigger.sum() == pytest.approx(4 * image.sum(), rel=0.25)
    assert bigger[0, 10, 10, 0] == pytest.approx(1.0)


def test_random_affine_seeded_and_in_range():
    images = np.zeros((16, 28, 28, 1), np.float32)
    images[:, 6:22, 12:16] = 1.0
    a = random_affine(images, seed=[3, 4]).numpy()
    b = random_affine(images, seed=[3, 4]).numpy()
    c = random_affine(images, seed=[3, 5]).numpy()
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    assert a.shape == images.shape
    # different images in a batch get different transforms
    assert not np.allclose(a[0], a[1])
    single = random_affine(images[0], seed=tf.constant([1, 2]))
    assert single.shape == (28, 28, 1)
    filled = random_affine(
        np.zeros((4, 10, 10, 1), np.float32), seed=[0, 0], fill_value=1.0, translation_range=0.4
    ).numpy()
    assert filled.max() == pytest.approx(1.0)  # background fill shows up at the borders


def test_numpy_augment_and_conversion_to_trainer_task():
    def shift(images, seed):
        return images + tf.cast(seed[0] % 3, images.dtype)

    task = _toy_task(augmentation=shift)
    out = task.numpy_augment(task.x_train[:4], np.random.default_rng(0))
    assert isinstance(out, np.ndarray) and out.shape == (4, 1)
    again = task.numpy_augment(task.x_train[:4], np.random.default_rng(0))
    np.testing.assert_array_equal(out, again)
    trainer_task = task.to_task(batch_size=5)
    xb, yb = next(trainer_task.batches("train", np.random.default_rng(1)))
    assert xb.shape == (5, 1) and yb.shape == (5,)
    x_test, y_test = trainer_task.test_data()
    np.testing.assert_array_equal(x_test, task.x_test)
    assert trainer_task.name == "toy" and trainer_task.info["num_classes"] == 4


def test_augment_is_compiled_once_and_matches_eager_ops():
    import functools

    from warpkeras.data import tasks as tasks_module

    aug = functools.partial(random_affine, fill_value=0.0)
    rng = np.random.default_rng(3)
    x = rng.random((6, 12, 12, 1)).astype(np.float32)
    first = ClassificationTask(x, np.arange(6) % 2, x[:2], np.arange(2), augmentation=aug)
    second = ClassificationTask(x[::-1], np.arange(6) % 2, x[:2], np.arange(2), augmentation=aug)
    seed = np.array([4, 9])
    eager = random_affine(x, seed=seed, fill_value=0.0).numpy()
    # graph rewrites reorder float32 arithmetic: equal up to round-off
    np.testing.assert_allclose(first.augment(x, seed).numpy(), eager, rtol=0, atol=1e-5)
    # a different batch size and a second task reuse the same compiled function
    second.augment(x[:3], seed)
    compiled = tasks_module._compiled(aug)
    assert compiled is tasks_module._compiled(aug)
    assert compiled.experimental_get_tracing_count() <= 2
