"""Few-shot N-way K-shot episodes."""

import pathlib

import numpy as np
import pytest

from warpkeras.data import EpisodeSampler, load_image_folder, load_omniglot, rotate_classes

SUBSET = pathlib.Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "omniglot"


def _coded_data():
    """Row i has value i, so episode rows can be traced back; classes have 8-15 examples."""
    rng = np.random.default_rng(0)
    counts = rng.integers(8, 16, size=12)
    y = np.repeat(np.arange(12) * 10 + 3, counts)  # non-contiguous original labels
    rng.shuffle(y)
    x = np.arange(len(y), dtype=np.float32).reshape(-1, 1, 1)
    return x, y


def _check_episode(ep, y, n, k, q):
    support_rows = ep.support_x.reshape(-1).astype(int)
    query_rows = ep.query_x.reshape(-1).astype(int)
    assert ep.support_x.shape == (n * k, 1, 1) and ep.query_x.shape == (n * q, 1, 1)
    assert ep.support_y.tolist() == np.repeat(np.arange(n), k).tolist()
    assert ep.query_y.tolist() == np.repeat(np.arange(n), q).tolist()
    assert len(set(ep.classes.tolist())) == n
    all_rows = np.concatenate([support_rows, query_rows])
    assert len(set(all_rows.tolist())) == len(all_rows)  # no example twice, no overlap
    np.testing.assert_array_equal(y[support_rows], ep.classes[ep.support_y])
    np.testing.assert_array_equal(y[query_rows], ep.classes[ep.query_y])


def test_episode_structure_and_disjointness():
    x, y = _coded_data()
    sampler = EpisodeSampler(x, y, num_ways=5, num_shots=3, num_queries=4, seed=1)
    for index in range(20):
        _check_episode(sampler.sample(index), y, 5, 3, 4)


def test_episodes_deterministic_and_dataset_matches_sample():
    x, y = _coded_data()
    a = EpisodeSampler(x, y, num_ways=4, num_shots=2, num_queries=3, seed=7)
    b = EpisodeSampler(x, y, num_ways=4, num_shots=2, num_queries=3, seed=7)
    c = EpisodeSampler(x, y, num_ways=4, num_shots=2, num_queries=3, seed=8)
    assert a.sample(2).support_x.tolist() == b.sample(2).support_x.tolist()
    assert a.sample(2).support_x.tolist() != a.sample(3).support_x.tolist()
    assert a.sample(2).support_x.tolist() != c.sample(2).support_x.tolist()
    for j, ((sx, _), (_, qy)) in enumerate(a.dataset(num_episodes=3, start=5)):
        ep = a.sample(5 + j)
        np.testing.assert_array_equal(sx.numpy(), ep.support_x)
        np.testing.assert_array_equal(qy.numpy(), ep.query_y)
    endless = a.dataset()
    assert len(list(endless.take(4))) == 4


def test_class_subset_small_classes_and_errors():
    x, y = _coded_data()
    allowed = np.unique(y)[:6]
    sampler = EpisodeSampler(x, y, num_ways=6, num_shots=1, num_queries=2, seed=0, classes=allowed)
    for index in range(5):
        assert set(sampler.sample(index).classes.tolist()) == set(allowed.tolist())
    with pytest.warns(UserWarning, match="leaving out"):
        EpisodeSampler(x, y, num_ways=2, num_shots=5, num_queries=8)
    with pytest.raises(ValueError, match="cannot draw 13-way"):
        EpisodeSampler(x, y, num_ways=13, num_shots=1, num_queries=1)
    with pytest.raises(ValueError, match="do not occur"):
        EpisodeSampler(x, y, classes=[999])


def test_uint8_inputs_scaled_and_as_task():
    x = np.full((40, 2, 2, 1), 255, dtype=np.uint8)
    y = np.repeat(np.arange(4), 10)
    ep = EpisodeSampler(x, y, num_ways=3, num_shots=2, num_queries=1, seed=0).sample(0)
    assert ep.support_x.dtype == np.float32 and np.all(ep.support_x == 1.0)
    task = ep.as_task()
    assert task.num_classes == 3 and task.num_train == 6 and task.num_test == 3


def test_rotate_classes():
    x = np.arange(2 * 3 * 3).reshape(2, 3, 3, 1)
    xr, yr = rotate_classes(x, np.array([0, 1]))
    assert yr.tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    np.testing.assert_array_equal(xr[2], np.rot90(x[0], 1))


def test_image_folder_layout(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, name in enumerate(["cat", "dog", "emu"]):
        (tmp_path / "split" / name).mkdir(parents=True)
        for i in range(4):
            pixels = np.full((10, 12, 3), 40 * c + i, dtype=np.uint8)
            pixels[0, 0] = rng.integers(0, 255, 3)
            Image.fromarray(pixels).save(tmp_path / "split" / name / f"{i}.png")
    x, y, names = load_image_folder(tmp_path / "split", image_size=8, cache_dir=tmp_path / "c")
    assert names == ["cat", "dog", "emu"]
    assert x.shape == (12, 8, 8, 3) and x.dtype == np.uint8
    assert y.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert x[5, 4, 4].tolist() == [41, 41, 41]
    assert list((tmp_path / "c" / "image_folders").glob("split_*.npz"))
    again = load_image_folder(tmp_path / "split", image_size=8, cache_dir=tmp_path / "c")
    np.testing.assert_array_equal(again[0], x)
    ep = EpisodeSampler(x, y, num_ways=3, num_shots=2, num_queries=2, seed=0).sample(0)
    assert ep.support_x.shape == (6, 8, 8, 3)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_image_folder(tmp_path / "missing")


@pytest.mark.skipif(
    not (SUBSET / "images_background_small1.zip").exists(),
    reason=f"shared Omniglot subset not found at {SUBSET.resolve()}",
)
def test_omniglot_episodes(tmp_path):
    data = load_omniglot(source="local", data_dir=SUBSET, cache_dir=tmp_path)
    x, y, names = data.character_arrays(["Korean", "Sanskrit"])
    sampler = EpisodeSampler(x, y, num_ways=20, num_shots=1, num_queries=5, seed=0)
    assert sampler.num_classes == 82
    ep = sampler.sample(0)
    assert ep.support_x.shape == (20, 28, 28, 1) and ep.query_x.shape == (100, 28, 28, 1)
    assert {names[c].split("/")[0] for c in ep.classes} <= {"Korean", "Sanskrit"}
    support = {img.tobytes() for img in ep.support_x}
    assert not any(img.tobytes() in support for img in ep.query_x)
    for label, char in enumerate(ep.classes):
        rows = data.drawings_of(int(char))
        stored = {(data.images[r].astype(np.float32) / 255.0).tobytes() for r in rows}
        assert all(img[..., 0].tobytes() in stored for img in ep.query_x[ep.query_y == label])
