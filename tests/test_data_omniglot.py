"""Omniglot loading and the multi-shot task distribution, on the shared real subset."""

import pathlib
import shutil
import zipfile

import numpy as np
import pytest

from warpkeras.data import (
    OmniglotData,
    OmniglotNotFoundError,
    OmniglotTasks,
    load_omniglot,
)
from warpkeras.data import omniglot as omniglot_module

SUBSET = pathlib.Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "omniglot"
EXPECTED_USABLE = [
    "Balinese",
    "Early_Aramaic",
    "Greek",
    "Japanese_(katakana)",
    "Korean",
    "Latin",
    "Sanskrit",
]

needs_subset = pytest.mark.skipif(
    not (SUBSET / "images_background_small1.zip").exists(),
    reason=f"shared Omniglot subset not found at {SUBSET.resolve()} (../shared/data/omniglot)",
)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("omniglot_cache")


@pytest.fixture(scope="module")
def data(cache_dir):
    if not (SUBSET / "images_background_small1.zip").exists():
        pytest.skip(f"shared Omniglot subset not found at {SUBSET.resolve()}")
    return load_omniglot(source="local", data_dir=SUBSET, cache_dir=cache_dir)


@pytest.fixture(scope="module")
def tasks(data):
    return OmniglotTasks(data, num_meta_val=1, num_meta_test=2, seed=0)


@needs_subset
def test_alphabets_deduplicated_and_usable(data):
    assert len(data.alphabet_names) == 8  # Greek and Latin are in both zips
    assert len(data.character_names) == 242
    assert len(data.images) == 242 * 20
    assert data.usable_alphabets(20) == EXPECTED_USABLE
    assert len(data.usable_alphabets(20)) == 7
    assert "Tagalog" in data.alphabet_names and "Tagalog" not in data.usable_alphabets(20)
    for char in range(len(data.character_names)):
        drawers = data.drawer_ids[data.drawings_of(char)]
        assert drawers.tolist() == list(range(1, 21))


@needs_subset
def test_image_shape_range_and_polarity(data, tasks):
    assert data.images.shape[1:] == (28, 28) and data.images.dtype == np.uint8
    task = tasks.meta_train[0]
    for x in (task.x_train, task.x_test):
        assert x.dtype == np.float32 and x.shape[1:] == (28, 28, 1)
        assert x.min() >= 0.0 and x.max() <= 1.0
    # inverted: strokes are bright on a dark background, corners are background
    assert task.x_train.mean() < 0.25
    assert np.all(task.x_train[:, 0, 0, 0] < 0.05)
    assert task.x_train.max() > 0.9


@needs_subset
def test_every_task_is_20_way_with_15_5_split(tasks):
    all_tasks = tasks.meta_train + tasks.meta_val + tasks.meta_test
    assert len(all_tasks) == 7
    for task in all_tasks:
        assert task.num_classes == 20
        assert np.bincount(task.y_train, minlength=20).tolist() == [15] * 20
        assert np.bincount(task.y_test, minlength=20).tolist() == [5] * 20
        assert len(set(task.class_names)) == 20
        assert all(name.startswith(task.name + "/") for name in task.class_names)


@needs_subset
def test_adaptation_and_test_drawings_disjoint(data, tasks):
    for task in tasks.meta_train + tasks.meta_test:
        train_rows, test_rows = tasks.drawing_indices(task.name)
        assert not set(train_rows.tolist()) & set(test_rows.tolist())
        np.testing.assert_array_equal(
            task.x_train[..., 0], data.images[train_rows] / np.float32(255)
        )
        np.testing.assert_array_equal(task.x_test[..., 0], data.images[test_rows] / np.float32(255))
        # the held-out drawings are those of drawers 1-5, for every character
        assert set(data.drawer_ids[test_rows].tolist()) == {1, 2, 3, 4, 5}
        assert set(data.drawer_ids[train_rows].tolist()) == set(range(6, 21))
        # labels follow characters
        for label, name in enumerate(task.class_names):
            char = data.character_names.index(name)
            assert np.all(data.character_ids[train_rows[task.y_train == label]] == char)
            assert np.all(data.character_ids[test_rows[task.y_test == label]] == char)


@needs_subset
def test_alphabet_splits_disjoint_and_seeded(data, tasks):
    train, val, test = (
        set(tasks.meta_train_alphabets),
        set(tasks.meta_val_alphabets),
        set(tasks.meta_test_alphabets),
    )
    assert (len(train), len(val), len(test)) == (4, 1, 2)
    assert not (train & test) and not (train & val) and not (val & test)
    assert train | val | test == set(EXPECTED_USABLE)
    again = OmniglotTasks(data, num_meta_val=1, num_meta_test=2, seed=0)
    assert again.meta_test_alphabets == tasks.meta_test_alphabets
    assert again.meta_train_alphabets == tasks.meta_train_alphabets
    np.testing.assert_array_equal(again.meta_train[0].x_train, tasks.meta_train[0].x_train)
    held_out = {
        tuple(OmniglotTasks(data, num_meta_val=1, num_meta_test=2, seed=s).meta_test_alphabets)
        for s in range(6)
    }
    assert len(held_out) > 1  # the held-out alphabets depend on the seed
    # characters of large alphabets are drawn by seed
    korean = {
        s: OmniglotTasks(data, num_meta_val=0, num_meta_test=0, seed=s).task("Korean").class_names
        for s in (0, 1)
    }
    assert korean[0] != korean[1]
    assert len(data.characters_of("Korean")) == 40


@needs_subset
def test_split_sizes_validated(data):
    with pytest.raises(ValueError, match="cannot split 7 usable alphabets"):
        OmniglotTasks(data, num_meta_val=10, num_meta_test=10)
    small = OmniglotTasks(data, num_meta_train=2, num_meta_val=0, num_meta_test=1, seed=3)
    assert len(small.meta_train) == 2 and len(small.meta_test) == 1
    with pytest.raises(KeyError, match="not usable"):
        small.task("Tagalog")
    batch = small.sample(5, split="train", rng=0)
    assert len(batch) == 5 and all(t in small.meta_train for t in batch)


@needs_subset
def test_augmentation_changes_pixels_keeps_shape(tasks):
    task = tasks.meta_train[0]
    plain = next(iter(task.train_dataset(batch_size=20, augment=False, seed=5)))
    augmented = next(iter(task.train_dataset(batch_size=20, augment=True, seed=5)))
    np.testing.assert_array_equal(plain[1].numpy(), augmented[1].numpy())  # same draw order
    assert augmented[0].shape == plain[0].shape == (20, 28, 28, 1)
    assert not np.allclose(plain[0].numpy(), augmented[0].numpy())
    assert 0.0 <= augmented[0].numpy().min() and augmented[0].numpy().max() <= 1.0 + 1e-6
    # the un-augmented batch is made of stored training images
    stored = {x.tobytes() for x in task.x_train}
    assert all(x.tobytes() in stored for x in plain[0].numpy())


@needs_subset
def test_pipelines_deterministic_under_seed(tasks):
    task = tasks.meta_train[1]

    def batches(seed):
        return [(x.numpy(), y.numpy()) for x, y in task.train_dataset(20, seed=seed).take(3)]

    first, second, other = batches(7), batches(7), batches(8)
    for (x1, y1), (x2, y2) in zip(first, second):
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)
    assert not np.array_equal(first[0][0], other[0][0])
    x_test, y_test = next(iter(task.test_dataset()))
    np.testing.assert_array_equal(x_test.numpy(), task.x_test)
    np.testing.assert_array_equal(y_test.numpy(), task.y_test)


def test_clear_error_when_no_source(tmp_path):
    empty = tmp_path / "nothing_here"
    empty.mkdir()
    with pytest.raises(OmniglotNotFoundError) as info:
        load_omniglot(source="local", data_dir=empty, cache_dir=tmp_path / "cache")
    message = str(info.value)
    assert "images_background.zip" in message and "images_evaluation.zip" in message
    assert str(empty) in message and "data_dir" in message
    with pytest.raises(OmniglotNotFoundError, match="images_background.zip"):
        load_omniglot(
            source="auto",
            data_dir=empty,
            cache_dir=tmp_path / "cache",
            tfds_data_dir=str(tmp_path / "tfds"),
            download=False,
        )
    with pytest.raises(ValueError, match="source must be one of"):
        load_omniglot(source="web")


@needs_subset
def test_cache_is_used_on_second_load(data, cache_dir, monkeypatch):
    files = list((pathlib.Path(cache_dir) / "omniglot").glob("omniglot_local_28px_*.npz"))
    assert len(files) == 1

    def no_decoding(*args, **kwargs):
        raise AssertionError("PNGs were decoded although a cache exists")

    monkeypatch.setattr(omniglot_module, "_decode_local", no_decoding)
    monkeypatch.setattr(omniglot_module, "_decode_png", no_decoding)
    again = load_omniglot(source="local", data_dir=SUBSET, cache_dir=cache_dir)
    np.testing.assert_array_equal(again.images, data.images)
    np.testing.assert_array_equal(again.character_ids, data.character_ids)
    assert again.alphabet_names == data.alphabet_names
    # without the cache the (patched) decoder must run: proves the patch bites
    with pytest.raises(AssertionError, match="were decoded"):
        load_omniglot(source="local", data_dir=SUBSET, cache_dir=cache_dir, use_cache=False)
    # a different image size is a different cache entry
    with pytest.raises(AssertionError, match="were decoded"):
        load_omniglot(source="local", data_dir=SUBSET, cache_dir=cache_dir, image_size=32)


@needs_subset
def test_extracted_folder_layout_matches_zip(data, tmp_path):
    root = tmp_path / "omniglot_folders"
    with zipfile.ZipFile(SUBSET / "images_background_small2.zip") as archive:
        members = [
            m
            for m in archive.namelist()
            if "/Latin/character0" in m
            and m.endswith(".png")
            and m.split("/")[-2] in ("character01", "character02")
        ]
        for member in members:
            parts = member.split("/")
            target = root / parts[-3] / parts[-2] / parts[-1]
            target.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(member) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
    assert len(members) == 40
    folder = load_omniglot(source="local", data_dir=root, cache_dir=tmp_path / "c")
    assert folder.alphabet_names == ["Latin"]
    assert folder.character_names == ["Latin/character01", "Latin/character02"]
    for char, name in enumerate(folder.character_names):
        expected = data.images[data.drawings_of(name)]
        np.testing.assert_array_equal(folder.images[folder.drawings_of(char)], expected)
    raw = load_omniglot(source="local", data_dir=root, cache_dir=tmp_path / "c", invert=False)
    # same drawings with the original polarity (rounding may differ by one level)
    diff = raw.images.astype(int) - (255 - folder.images.astype(int))
    assert np.abs(diff).max() <= 1


@needs_subset
def test_character_arrays_for_few_shot(data):
    x, y, names = data.character_arrays(["Greek", "Latin"])
    assert x.shape == ((24 + 26) * 20, 28, 28, 1) and x.dtype == np.float32
    assert len(np.unique(y)) == 50
    assert {names[c].split("/")[0] for c in np.unique(y)} == {"Greek", "Latin"}


def test_tfds_source_code_path(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=30):
        data = load_omniglot(source="tfds", cache_dir=tmp_path, image_size=20)
    assert isinstance(data, OmniglotData)
    assert data.images.shape[1:] == (20, 20) and data.images.dtype == np.uint8
    assert 1 <= len(data.images) <= 30
    assert data.source.startswith("tfds:omniglot")
    assert all("/character" in name for name in data.character_names)
    assert list((tmp_path / "omniglot").glob("omniglot_tfds_20px_*.npz"))
