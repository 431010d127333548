"""Data files: unreadable inputs are named (or skipped on request), transparent PNGs are
composited over the background, caches are keyed by content and repair themselves, an
offline first load fails at once, every loader argument is checked, and the TensorFlow
Datasets path (library and example) runs under ``tfds.testing.mock_data``.

Every test builds its own small files in ``tmp_path``.
"""

import importlib.util
import io
import logging
import os
import pathlib
import socket
import sys
import time
import warnings
import zipfile

import numpy as np
import pytest
from PIL import Image

from warpkeras.data import (
    ContinualSineDistribution,
    ContinualSineTask,
    CorruptFileError,
    EpisodeSampler,
    LossSurface,
    LossSurfaceDistribution,
    SineTask,
    SineTaskDistribution,
    load_image_folder,
    rotate_classes,
)
from warpkeras.data import omniglot as omniglot_module
from warpkeras.data.omniglot import (
    OmniglotData,
    OmniglotNotFoundError,
    OmniglotTasks,
    load_omniglot,
)

REPO = pathlib.Path(__file__).resolve().parent.parent
SIDE = 20  # side of the fake drawings, in pixels


# ----------------------------------------------------------------------------------------
# helpers


def drawing(character, drawer):
    """A raw Omniglot-style drawing: black (0) strokes on white (255), unique per key."""
    img = np.full((SIDE, SIDE), 255, np.uint8)
    row = 2 + 3 * character
    img[row : row + 3, 2 + drawer : 2 + drawer + 8] = 0
    return img


def png_bytes(array, mode=None):
    buffer = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buffer, format="PNG")
    return buffer.getvalue()


def omniglot_members(prefix="", characters=2, drawers=3):
    """{relative path: PNG bytes} in the dataset's layout."""
    out = {}
    for c in range(1, characters + 1):
        for d in range(1, drawers + 1):
            name = f"{prefix}Alpha/character{c:02d}/{c:02d}00_{d:02d}.png"
            out[name] = png_bytes(drawing(c, d))
    return out


def write_folder(root, members):
    for name, data in members.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def write_zip(path, members, compression=zipfile.ZIP_DEFLATED):
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=compression) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def corrupt_member(path, member, where="middle"):
    """Overwrite the middle (or the start) of a member's compressed data, in place: in the
    middle the CRC check fails, at the start the deflate stream itself is invalid."""
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(member)
    raw = bytearray(path.read_bytes())
    name_len = int.from_bytes(raw[info.header_offset + 26 : info.header_offset + 28], "little")
    extra_len = int.from_bytes(raw[info.header_offset + 28 : info.header_offset + 30], "little")
    start = info.header_offset + 30 + name_len + extra_len
    if where == "start":
        raw[start : start + 4] = b"\xff" * 4
    else:
        middle = start + info.compress_size // 2
        raw[middle : middle + 16] = bytes(range(200, 216))
    path.write_bytes(bytes(raw))


def load(root, cache, **kwargs):
    return load_omniglot(source="local", data_dir=root, cache_dir=cache, image_size=SIDE, **kwargs)


# ----------------------------------------------------------------------------------------
# unreadable inputs


def _bad_png_in_folder(tmp_path, kind):
    root = write_folder(tmp_path / "data", omniglot_members())
    bad = root / "Alpha" / "character02" / "0200_02.png"
    good = bad.read_bytes()
    if kind == "corrupt":
        data = bytearray(good)
        data[40:] = bytes(len(data) - 40)  # header kept, image data zeroed
        bad.write_bytes(bytes(data))
    elif kind == "truncated":
        bad.write_bytes(good[: len(good) // 2])
    elif kind == "text":
        bad.write_text("this is not an image\n")
    elif kind == "empty":
        bad.write_bytes(b"")
    return root, [f"file '{bad}'"]


def _truncated_zip(tmp_path):
    root = tmp_path / "data"
    write_folder(root, omniglot_members(characters=1))  # extracted character01
    archive = write_zip(
        root / "images_background.zip", omniglot_members("images_background/", characters=2)
    )
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    return root, [f"file '{archive}'"]


def _corrupt_member(tmp_path, where="middle"):
    root = tmp_path / "data"
    archive = write_zip(
        root / "images_background.zip", omniglot_members("images_background/", characters=2)
    )
    member = "images_background/Alpha/character02/0200_02.png"
    corrupt_member(archive, member, where)
    return root, [f"member '{member}' of archive '{archive}'"]


def _png_member_not_png(tmp_path):
    root = tmp_path / "data"
    members = omniglot_members("images_background/", characters=2)
    member = "images_background/Alpha/character01/0100_03.png"
    members[member] = b"<html>404 not found</html>"
    archive = write_zip(root / "images_background.zip", members)
    return root, [f"member '{member}' of archive '{archive}'"]


BAD_INPUTS = {
    "corrupt_png": lambda tmp: _bad_png_in_folder(tmp, "corrupt"),
    "truncated_png": lambda tmp: _bad_png_in_folder(tmp, "truncated"),
    "text_named_png": lambda tmp: _bad_png_in_folder(tmp, "text"),
    "zero_byte_png": lambda tmp: _bad_png_in_folder(tmp, "empty"),
    "truncated_zip": _truncated_zip,
    "corrupt_zip_member": _corrupt_member,
    "invalid_deflate_stream": lambda tmp: _corrupt_member(tmp, "start"),
    "zip_member_not_png": _png_member_not_png,
}
# readable drawings left in each case (2 characters x 3 drawings, less what is broken)
READABLE_LEFT = {
    "corrupt_png": 5,
    "truncated_png": 5,
    "text_named_png": 5,
    "zero_byte_png": 5,
    "truncated_zip": 3,
    "corrupt_zip_member": 5,
    "invalid_deflate_stream": 5,
    "zip_member_not_png": 5,
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_unreadable_input_is_named(tmp_path, case):
    root, where = BAD_INPUTS[case](tmp_path)
    with pytest.raises(CorruptFileError) as info:
        load(root, tmp_path / "cache")
    message = str(info.value)
    assert where[0] in message, message
    assert "skip_corrupt=True" in message
    assert isinstance(info.value, ValueError) and isinstance(info.value, OSError)
    assert info.value.where == where[0]
    assert "<_io.BytesIO" not in message
    # nothing half-built was cached
    assert not list((tmp_path / "cache").rglob("*.npz"))


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_skip_corrupt_warns_names_and_goes_on(tmp_path, case):
    root, where = BAD_INPUTS[case](tmp_path)
    with pytest.warns(UserWarning) as record:
        data = load(root, tmp_path / "cache", skip_corrupt=True)
    messages = [str(w.message) for w in record]
    assert any(where[0] in m and m.startswith("skipping unreadable") for m in messages), messages
    assert data.skipped == where
    assert len(data.images) == READABLE_LEFT[case]
    # the cached copy says again what it leaves out
    with pytest.warns(UserWarning, match="leaves out 1 unreadable files"):
        again = load(root, tmp_path / "cache", skip_corrupt=True)
    np.testing.assert_array_equal(again.images, data.images)
    assert again.skipped == where
    # a cache built while skipping is never served when not skipping
    with pytest.raises(CorruptFileError):
        load(root, tmp_path / "cache")


def test_skipped_extracted_png_falls_back_to_the_zip_copy(tmp_path):
    root = write_folder(tmp_path / "data", omniglot_members(characters=1))
    write_zip(root / "images_background.zip", omniglot_members("images_background/", characters=1))
    reference = load(root, tmp_path / "c0")
    (root / "Alpha" / "character01" / "0100_01.png").write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="skipping unreadable file"):
        data = load(root, tmp_path / "c1", skip_corrupt=True)
    np.testing.assert_array_equal(data.images, reference.images)


def test_image_folder_unreadable_file_is_named_or_skipped(tmp_path):
    root = tmp_path / "folder"
    for label in ("a", "b"):
        for i in range(2):
            path = root / label / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(png_bytes(drawing(i, i)))
    bad = root / "b" / "1.png"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(CorruptFileError, match=f"file '{bad}'"):
        load_image_folder(root, mode="L", cache_dir=tmp_path / "cache")
    with pytest.warns(UserWarning, match=f"skipping unreadable file '{bad}'"):
        x, y, names = load_image_folder(
            root, mode="L", cache_dir=tmp_path / "cache", skip_corrupt=True
        )
    assert x.shape == (3, SIDE, SIDE, 1) and y.tolist() == [0, 0, 1] and names == ["a", "b"]
    with pytest.warns(UserWarning, match="leave out 1 unreadable files"):
        load_image_folder(root, mode="L", cache_dir=tmp_path / "cache", skip_corrupt=True)


# ----------------------------------------------------------------------------------------
# transparent backgrounds


def _transparent(image, mode):
    """The drawing with opaque black strokes on a fully transparent (black) background."""
    alpha = np.where(image == 0, 255, 0).astype(np.uint8)
    black = np.zeros_like(image)
    if mode == "RGBA":
        return png_bytes(np.stack([black, black, black, alpha], -1), "RGBA")
    if mode == "LA":
        return Image.fromarray(np.stack([black, alpha], -1), "LA")
    raise ValueError(mode)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P_transparency"])
def test_transparent_background_is_composited_over_white(tmp_path, mode):
    opaque = omniglot_members()
    members = {}
    for name in opaque:
        char, drawer = int(name.split("/")[1][-2:]), int(name[-6:-4])
        image = drawing(char, drawer)
        if mode == "RGBA":
            members[name] = _transparent(image, "RGBA")
        elif mode == "LA":
            buffer = io.BytesIO()
            _transparent(image, "LA").save(buffer, format="PNG")
            members[name] = buffer.getvalue()
        else:  # palette: index 0 black opaque stroke, index 1 black but transparent
            pal = Image.fromarray(np.where(image == 0, 0, 1).astype(np.uint8), "P")
            pal.putpalette([0, 0, 0, 0, 0, 0])
            buffer = io.BytesIO()
            pal.save(buffer, format="PNG", transparency=1)
            members[name] = buffer.getvalue()
    reference = load(write_folder(tmp_path / "opaque", opaque), tmp_path / "cache")
    data = load(write_folder(tmp_path / "transparent", members), tmp_path / "cache")
    np.testing.assert_array_equal(data.images, reference.images)
    # inverted: background 0, strokes 255; a small ink fraction, not solid ink
    assert data.images.mean() < 60 and data.images[:, 0, 0].max() == 0
    raw = load(tmp_path / "transparent", tmp_path / "cache", invert=False)
    assert raw.images[:, 0, 0].min() == 255  # white background in the raw polarity


def test_omniglot_background_is_white_in_the_shared_pngs():
    """The raw Omniglot PNGs are black strokes on a white background (mode '1')."""
    subset = REPO.parent / "shared" / "data" / "omniglot" / "images_background_small1.zip"
    if not subset.exists():
        pytest.skip(f"shared Omniglot subset not found at {subset}")
    with zipfile.ZipFile(subset) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".png"))
        with Image.open(io.BytesIO(archive.read(name))) as img:
            grey = np.asarray(img.convert("L"))
    assert grey[0, 0] == omniglot_module._RAW_BACKGROUND == 255
    assert np.mean(grey == 255) > 0.8  # mostly background


# ----------------------------------------------------------------------------------------
# caches keyed by content


def test_png_replaced_in_place_is_read_again(tmp_path):
    root = write_folder(tmp_path / "data", omniglot_members())
    first = load(root, tmp_path / "cache")
    target = root / "Alpha" / "character01" / "0100_01.png"
    stat = target.stat()
    new = np.full((SIDE, SIDE), 255, np.uint8)
    new[10:18, 10:18] = 0  # a different drawing
    target.write_bytes(png_bytes(new))
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 2_000_000_000))
    second = load(root, tmp_path / "cache")
    row = int(first.drawings_of("Alpha/character01")[0])
    assert not np.array_equal(first.images[row], second.images[row])
    np.testing.assert_array_equal(second.images[row], 255 - new)
    others = np.arange(len(first.images)) != row
    np.testing.assert_array_equal(first.images[others], second.images[others])


def test_image_folder_file_replaced_in_place_with_same_size_is_read_again(tmp_path):
    root = tmp_path / "folder"
    (root / "a").mkdir(parents=True)
    target = root / "a" / "0.bmp"  # BMP: same size on disk for any content
    Image.fromarray(drawing(1, 1)).save(target)
    x1, _, _ = load_image_folder(root, mode="L", cache_dir=tmp_path / "cache")
    stat = target.stat()
    Image.fromarray(drawing(3, 5)).save(target)
    assert target.stat().st_size == stat.st_size
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 2_000_000_000))
    x2, _, _ = load_image_folder(root, mode="L", cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(x2[0, ..., 0], drawing(3, 5))
    assert not np.array_equal(x1, x2)


DAMAGE = {
    "zero_bytes": lambda data: b"",
    "truncated": lambda data: data[: len(data) // 2],
    "garbage": lambda data: b"garbage" * 100,
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_omniglot_cache_is_rebuilt(tmp_path, damage):
    root = write_folder(tmp_path / "data", omniglot_members())
    reference = load(root, tmp_path / "cache")
    (cache_file,) = (tmp_path / "cache" / "omniglot").glob("*.npz")
    cache_file.write_bytes(DAMAGE[damage](cache_file.read_bytes()))
    with pytest.warns(UserWarning, match="rebuilding it") as record:
        again = load(root, tmp_path / "cache")
    assert str(cache_file) in str(record[0].message)
    np.testing.assert_array_equal(again.images, reference.images)
    # repaired: the next load reads the cache without warnings or decoding
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        third = load(root, tmp_path / "cache")
    np.testing.assert_array_equal(third.images, reference.images)


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_image_folder_cache_is_rebuilt(tmp_path, damage):
    root = tmp_path / "folder"
    (root / "a").mkdir(parents=True)
    Image.fromarray(drawing(1, 1)).save(root / "a" / "0.png")
    x, _, _ = load_image_folder(root, mode="L", cache_dir=tmp_path / "cache")
    (cache_file,) = (tmp_path / "cache" / "image_folders").glob("*.npz")
    cache_file.write_bytes(DAMAGE[damage](cache_file.read_bytes()))
    with pytest.warns(UserWarning, match="rebuilding it"):
        again, _, _ = load_image_folder(root, mode="L", cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(again, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_image_folder(root, mode="L", cache_dir=tmp_path / "cache")


def test_unwritable_cache_warns_and_still_loads(tmp_path, monkeypatch):
    root = write_folder(tmp_path / "data", omniglot_members())

    def refuse(*args, **kwargs):
        raise PermissionError("read-only file system")

    monkeypatch.setattr("warpkeras.data._cache.save_npz", refuse)
    with pytest.warns(UserWarning, match="could not write the Omniglot cache file"):
        data = load(root, tmp_path / "cache")
    assert len(data.images) == 6


# ----------------------------------------------------------------------------------------
# source="auto" with no local copy


def _no_download(*args, **kwargs):
    raise AssertionError("tfds.load was called: a download was attempted")


def test_auto_without_local_copy_fails_fast_when_offline(tmp_path, monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")
    probes = []

    def offline(host, port, timeout):
        probes.append((host, port, timeout))
        return False

    monkeypatch.setattr(omniglot_module, "_network_reachable", offline)
    monkeypatch.setattr(tfds, "load", _no_download)
    empty = tmp_path / "empty"
    empty.mkdir()
    start = time.perf_counter()
    with pytest.raises(OmniglotNotFoundError) as info:
        load_omniglot(
            source="auto",
            data_dir=empty,
            cache_dir=tmp_path / "cache",
            tfds_data_dir=str(tmp_path / "tfds"),
        )
    assert time.perf_counter() - start < 20
    message = str(info.value)
    assert "cannot be reached" in message and "github.com:443" in message
    assert str(tmp_path / "tfds") in message  # where it looked for a download
    assert "images_background.zip" in message and str(empty) in message
    assert probes == [("github.com", 443, 3.0)]


def test_auto_says_at_once_that_it_downloads(tmp_path, monkeypatch, caplog):
    tfds = pytest.importorskip("tensorflow_datasets")
    monkeypatch.setattr(omniglot_module, "_network_reachable", lambda *a: True)

    def download_starts(*args, **kwargs):
        # the message is out before tensorflow-datasets starts its (slow) work
        assert any("downloading 'omniglot'" in r.getMessage() for r in caplog.records)
        raise ConnectionError("stopped by the test")

    monkeypatch.setattr(tfds, "load", download_starts)
    empty = tmp_path / "empty"
    empty.mkdir()
    with caplog.at_level(logging.WARNING, logger="warpkeras.data.omniglot"):
        with pytest.raises(OmniglotNotFoundError, match="stopped by the test"):
            load_omniglot(
                source="auto",
                data_dir=empty,
                cache_dir=tmp_path / "cache",
                tfds_data_dir=str(tmp_path / "tfds"),
            )
    (record,) = [r for r in caplog.records if "downloading" in r.getMessage()]
    assert str(tmp_path / "tfds") in record.getMessage()


def test_no_probe_without_download(tmp_path, monkeypatch):
    pytest.importorskip("tensorflow_datasets")

    def probe(*args):
        raise AssertionError("probed although download=False")

    monkeypatch.setattr(omniglot_module, "_network_reachable", probe)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(OmniglotNotFoundError, match="images_background.zip"):
        load_omniglot(
            source="auto",
            data_dir=empty,
            cache_dir=tmp_path / "cache",
            tfds_data_dir=str(tmp_path / "tfds"),
            download=False,
        )


def test_network_probe_is_short_and_right():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        assert omniglot_module._network_reachable("127.0.0.1", port, 2.0)
    # nothing listens there any more: refused at once
    start = time.perf_counter()
    assert not omniglot_module._network_reachable("127.0.0.1", port, 2.0)
    assert time.perf_counter() - start < 2.5
    # an unresolvable name
    assert not omniglot_module._network_reachable("no-such-host.invalid", 443, 1.0)


# ----------------------------------------------------------------------------------------
# TensorFlow Datasets path, mocked


def _fake_omniglot(alphabets=2, characters=20, drawings=7):
    """A tfds `_as_dataset` replacement: known drawings, white background, RGB uint8."""
    import tensorflow as tf

    def as_dataset(self, *args, **kwargs):
        def examples():
            for a in range(alphabets):
                for c in range(characters):
                    for d in range(drawings):
                        img = np.full((105, 105, 3), 255, np.uint8)
                        img[5 + 4 * c : 9 + 4 * c, 5 + 10 * d : 12 + 10 * d + 3 * a] = 0
                        yield {
                            "image": img,
                            "alphabet": a,
                            "alphabet_char_id": c,
                            "label": a * characters + c,
                        }

        return tf.data.Dataset.from_generator(
            examples,
            output_signature={
                "image": tf.TensorSpec((105, 105, 3), tf.uint8),
                "alphabet": tf.TensorSpec((), tf.int64),
                "alphabet_char_id": tf.TensorSpec((), tf.int64),
                "label": tf.TensorSpec((), tf.int64),
            },
        )

    return as_dataset


def test_tfds_source_under_mock_data(tmp_path, monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")
    monkeypatch.setattr(omniglot_module, "_network_reachable", _unexpected_probe)
    with tfds.testing.mock_data(as_dataset_fn=_fake_omniglot()):
        data = load_omniglot(source="tfds", cache_dir=tmp_path, tfds_splits="train")
        label = tfds.builder("omniglot").info.features["alphabet"]
        names = [label.int2str(0), label.int2str(1)]  # the mock's ClassLabel: "0", "1"
    assert isinstance(data, OmniglotData)
    assert data.source == "tfds:omniglot[train]"
    assert data.images.shape == (2 * 20 * 7, 28, 28) and data.images.dtype == np.uint8
    assert data.alphabet_names == sorted(names)
    assert data.character_names[:2] == [f"{names[0]}/character01", f"{names[0]}/character02"]
    assert np.bincount(data.character_ids).tolist() == [7] * 40
    assert data.usable_alphabets(20) == data.alphabet_names
    assert data.images[:, 0, 0].max() == 0 and data.images.max() == 255  # inverted
    # the auto source with no local copy takes the same path
    empty = tmp_path / "empty"
    empty.mkdir()
    with tfds.testing.mock_data(as_dataset_fn=_fake_omniglot()):
        auto = load_omniglot(
            source="auto", data_dir=empty, cache_dir=tmp_path / "c2", tfds_splits=("train",)
        )
    np.testing.assert_array_equal(auto.images, data.images)
    tasks = OmniglotTasks(auto, num_meta_val=0, num_meta_test=1, seed=0)
    assert len(tasks.meta_train) == 1 and tasks.meta_train[0].num_classes == 20


def _unexpected_probe(*args):
    raise AssertionError("the network was probed under tfds.testing.mock_data")


def _import_example(name):
    path = REPO / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_example_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_source_tfds_under_mock_data(tmp_path, monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")
    monkeypatch.setenv("WARPKERAS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(omniglot_module, "_network_reachable", _unexpected_probe)
    monkeypatch.setattr(sys, "path", list(sys.path))
    example = _import_example("omniglot")
    args = example.build_parser().parse_args(
        ["--smoke", "--source", "tfds", "--output-dir", str(tmp_path / "out")]
    )
    cfg = example.resolve_config(args)
    with tfds.testing.mock_data(as_dataset_fn=_fake_omniglot()):
        data = example.load_data(args, cfg)
    assert data.source == "tfds:omniglot[train+test]"
    assert len(data.usable_alphabets(20)) == 2
    assert list((tmp_path / "cache" / "omniglot").glob("omniglot_tfds_*.npz"))
    split = example.split_tasks(data, cfg, seed=0)
    (tasks,) = [part for part in split if isinstance(part, OmniglotTasks)]
    assert len(tasks.meta_train) == 1 and len(tasks.meta_test) == 1


def test_few_shot_example_source_tfds_under_mock_data(tmp_path, monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")
    monkeypatch.setenv("WARPKERAS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(omniglot_module, "_network_reachable", _unexpected_probe)
    monkeypatch.setattr(sys, "path", list(sys.path))
    example = _import_example("few_shot")
    args = example.build_parser().parse_args(
        ["--smoke", "--source", "tfds", "--output-dir", str(tmp_path / "out")]
    )
    cfg = example.resolve_config(args)
    with tfds.testing.mock_data(as_dataset_fn=_fake_omniglot(alphabets=3, drawings=4)):
        data = example.load_data(args)
    assert data.source == "tfds:omniglot[train+test]"
    assert len(data.alphabet_names) == 3 and len(data.images) == 3 * 20 * 4
    train, test = example.samplers(data, cfg, 0, 1)[:2]
    episode = test.sample(0)
    ways, queries = cfg["ways"], cfg["queries"]
    assert episode.support_x.shape == (ways, 28, 28, 1)
    assert episode.query_y.tolist() == np.repeat(np.arange(ways), queries).tolist()
    assert train.num_classes == 20 and test.num_classes == 40


# ----------------------------------------------------------------------------------------
# bad arguments of the loaders


@pytest.fixture
def small_data():
    rng = np.random.default_rng(0)
    alphabets, chars, drawers = 2, 3, 4
    n = alphabets * chars * drawers
    char_ids = np.repeat(np.arange(alphabets * chars), drawers)
    return OmniglotData(
        images=rng.integers(0, 256, (n, 8, 8), dtype=np.uint8),
        alphabet_ids=char_ids // chars,
        character_ids=char_ids,
        drawer_ids=np.tile(np.arange(1, drawers + 1), alphabets * chars),
        alphabet_names=["A", "B"],
        character_names=[
            f"{'AB'[i // chars]}/character{i % chars + 1:02d}" for i in range(alphabets * chars)
        ],
    )


@pytest.fixture
def image_root(tmp_path):
    root = tmp_path / "images"
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        Image.fromarray(drawing(1, 1)).save(root / label / "0.png")
    return root


FILE = "<a file>"
MISSING = "<a missing folder>"

# (call, argument, bad value, exception, words the message must contain)
BAD_ARGUMENTS = [
    ("load_omniglot", "source", "web", ValueError, "source must be one of"),
    ("load_omniglot", "source", None, ValueError, "source must be one of"),
    ("load_omniglot", "data_dir", 123, TypeError, "data_dir must be a folder path"),
    ("load_omniglot", "data_dir", "", ValueError, "data_dir must name a folder"),
    ("load_omniglot", "data_dir", FILE, NotADirectoryError, "data_dir=.* is a file"),
    ("load_omniglot", "image_size", 0, ValueError, "image_size must be an integer >= 1"),
    ("load_omniglot", "image_size", 28.5, ValueError, "image_size must be an integer >= 1"),
    ("load_omniglot", "image_size", "28", TypeError, "image_size must be an integer >= 1"),
    ("load_omniglot", "image_size", True, TypeError, "image_size must be an integer"),
    ("load_omniglot", "invert", "no", TypeError, "invert must be True or False"),
    ("load_omniglot", "cache_dir", FILE, NotADirectoryError, "cache_dir=.* is a file"),
    ("load_omniglot", "cache_dir", 3.0, TypeError, "cache_dir must be a folder path"),
    ("load_omniglot", "use_cache", "yes", TypeError, "use_cache must be True or False"),
    ("load_omniglot", "download", "no", TypeError, "download must be True or False"),
    ("load_omniglot", "tfds_data_dir", 5, TypeError, "tfds_data_dir must be a folder path"),
    ("load_omniglot", "tfds_splits", (), ValueError, "tfds_splits must name at least one"),
    ("load_omniglot", "tfds_splits", 5, TypeError, "tfds_splits must be a split name"),
    ("load_omniglot", "tfds_splits", ("train", 3), ValueError, "tfds_splits must name"),
    ("load_omniglot", "skip_corrupt", "yes", TypeError, "skip_corrupt must be True or False"),
    ("OmniglotTasks", "data", "omniglot", TypeError, "data must be an OmniglotData"),
    ("OmniglotTasks", "num_classes", 1, ValueError, "num_classes must be an integer >= 2"),
    ("OmniglotTasks", "num_classes", "20", TypeError, "num_classes must be an integer >= 2"),
    ("OmniglotTasks", "num_test_per_class", -1, ValueError, "num_test_per_class must be"),
    ("OmniglotTasks", "num_train_per_class", 0, ValueError, "num_train_per_class must be"),
    ("OmniglotTasks", "num_train_per_class", 1.5, ValueError, "num_train_per_class must be"),
    ("OmniglotTasks", "num_meta_train", -1, ValueError, "num_meta_train must be"),
    ("OmniglotTasks", "num_meta_train", 5, ValueError, "lower the split sizes"),
    ("OmniglotTasks", "num_meta_val", -1, ValueError, "num_meta_val must be"),
    ("OmniglotTasks", "num_meta_test", "1", TypeError, "num_meta_test must be"),
    ("OmniglotTasks", "seed", -1, ValueError, "seed must be an integer >= 0"),
    ("OmniglotTasks", "seed", "abc", TypeError, "seed must be an integer >= 0"),
    ("OmniglotTasks", "seed", None, TypeError, "seed must be an integer >= 0"),
    ("OmniglotTasks", "augmentation", "affine", TypeError, "augmentation must be a callable"),
    ("OmniglotTasks", "source", "local", TypeError, "given together with data"),
    ("OmniglotTasks.sample", "num_tasks", 0, ValueError, "num_tasks must be an integer >= 1"),
    ("OmniglotTasks.sample", "num_tasks", "3", TypeError, "num_tasks must be an integer"),
    ("OmniglotTasks.sample", "num_tasks", 9, ValueError, "lower num_tasks or pass replace"),
    ("OmniglotTasks.sample", "split", "bogus", ValueError, "split must be 'train', 'val'"),
    ("OmniglotTasks.sample", "split", 3, TypeError, "split must be 'train', 'val'"),
    ("OmniglotTasks.sample", "split", "val", ValueError, "split 'val' has no tasks"),
    ("OmniglotTasks.sample", "replace", "no", TypeError, "replace must be True or False"),
    ("OmniglotTasks.sample", "rng", "abc", TypeError, "rng must be a numpy Generator"),
    ("EpisodeSampler", "x", np.zeros((0, 4)), ValueError, "x must hold at least one"),
    ("EpisodeSampler", "y", np.arange(3), ValueError, "y must be 1-D with one label"),
    ("EpisodeSampler", "num_ways", 0, ValueError, "num_ways must be an integer >= 1"),
    ("EpisodeSampler", "num_ways", "5", TypeError, "num_ways must be an integer >= 1"),
    ("EpisodeSampler", "num_ways", 9, ValueError, "cannot draw 9-way episodes"),
    ("EpisodeSampler", "num_shots", 0, ValueError, "num_shots must be an integer >= 1"),
    ("EpisodeSampler", "num_queries", -1, ValueError, "num_queries must be an integer >= 0"),
    ("EpisodeSampler", "seed", "abc", TypeError, "seed must be a non-negative int"),
    ("EpisodeSampler", "seed", -3, ValueError, "seed must be a non-negative int"),
    ("EpisodeSampler", "classes", [0, 99], ValueError, r"classes \[99\] do not occur in y"),
    ("EpisodeSampler.sample", "index", -1, ValueError, "index must be an integer >= 0"),
    ("EpisodeSampler.sample", "index", "1", TypeError, "index must be an integer >= 0"),
    ("EpisodeSampler.dataset", "num_episodes", -1, ValueError, "num_episodes must be"),
    ("EpisodeSampler.dataset", "start", -2, ValueError, "start must be an integer >= 0"),
    ("load_image_folder", "root", None, TypeError, "root must be a folder path"),
    ("load_image_folder", "root", FILE, NotADirectoryError, "root=.* is a file"),
    ("load_image_folder", "root", MISSING, FileNotFoundError, "pass root=<existing folder>"),
    ("load_image_folder", "image_size", 0, ValueError, "image_size must be an integer >= 1"),
    ("load_image_folder", "image_size", "84", TypeError, "image_size must be an integer"),
    ("load_image_folder", "image_size", (0, 5), ValueError, "image_size must be an integer"),
    ("load_image_folder", "image_size", (1, 2, 3), ValueError, r"\(height, width\) pair"),
    ("load_image_folder", "mode", "CMYK", ValueError, "mode must be 'RGB' or 'L'"),
    ("load_image_folder", "cache_dir", FILE, NotADirectoryError, "cache_dir=.* is a file"),
    ("load_image_folder", "use_cache", "yes", TypeError, "use_cache must be True or False"),
    ("load_image_folder", "extensions", (), ValueError, "extensions must be a non-empty"),
    ("load_image_folder", "extensions", [1], ValueError, "extensions must be a non-empty"),
    ("load_image_folder", "skip_corrupt", 1, TypeError, "skip_corrupt must be True or False"),
    ("rotate_classes", "rotations", (), ValueError, "rotations must not be empty"),
    ("rotate_classes", "rotations", 1, TypeError, "rotations must be a sequence"),
    ("rotate_classes", "rotations", ("a",), TypeError, "rotations must be an integer"),
    ("rotate_classes", "rotations", (0, 4), ValueError, "repeat a rotation"),
    ("rotate_classes", "y", np.arange(2), ValueError, "y must hold one integer label"),
    ("rotate_classes", "x", np.zeros((3, 4, 5)), ValueError, "x must hold square images"),
    # synthetic task distributions
    ("SineTask", "amplitude", "big", TypeError, "amplitude must be a finite number"),
    ("SineTask", "phase", float("nan"), ValueError, "phase must be a finite number"),
    ("SineTask", "x_range", 5.0, ValueError, r"x_range must be a \(low, high\) pair"),
    ("SineTask", "x_range", (5.0, -5.0), ValueError, "x_range must satisfy low <= high"),
    ("SineTask", "x_range", (-np.inf, 5.0), ValueError, "x_range must be a finite number"),
    ("SineTask.sample", "num_points", -1, ValueError, "num_points must be an integer >= 0"),
    ("SineTask.sample", "num_points", "10", TypeError, "num_points must be an integer"),
    ("SineTask.dataset", "batch_size", 0, ValueError, "batch_size must be an integer >= 1"),
    ("SineTaskDistribution", "amplitude_range", (0.1,), ValueError, "amplitude_range must be"),
    ("SineTaskDistribution", "phase_range", ("a", 1), TypeError, "phase_range must be a finite"),
    ("SineTaskDistribution.sample_tasks", "num_tasks", "4", TypeError, "num_tasks must be"),
    ("SineTaskDistribution.sample_tasks", "num_tasks", -1, ValueError, "num_tasks must be"),
    ("ContinualSineTask", "a1", None, TypeError, "a1 must be a finite number"),
    ("ContinualSineTask", "offset", np.inf, ValueError, "offset must be a finite number"),
    ("ContinualSineTask", "num_subtasks", 0, ValueError, "num_subtasks must be an integer"),
    ("ContinualSineTask", "num_subtasks", "5", TypeError, "num_subtasks must be an integer"),
    (
        "ContinualSineTask.training_batches",
        "steps_per_subtask",
        0,
        ValueError,
        "steps_per_subtask must be an integer >= 1",
    ),
    (
        "ContinualSineTask.training_batches",
        "batch_size",
        2.5,
        ValueError,
        "batch_size must be an integer >= 1",
    ),
    (
        "ContinualSineTask.training_batches",
        "order",
        [0, 0],
        ValueError,
        "order must be a permutation",
    ),
    ("ContinualSineDistribution", "num_subtasks", 0, ValueError, "num_subtasks must be"),
    ("ContinualSineDistribution", "offset_range", (1, 0), ValueError, "offset_range must"),
    ("LossSurface", "s", 0, ValueError, "s must be non-zero"),
    ("LossSurface", "s", "2", TypeError, "s must be a finite number"),
    ("LossSurface", "a", (1, 0), ValueError, "a must have 3 entries"),
    ("LossSurface", "b", (1, 0, "x"), TypeError, "b must be a finite number"),
    ("LossSurface", "variant", "valley", ValueError, "variant must be one of"),
    ("LossSurface.grid", "limits", (3.0, -3.0), ValueError, "limits must satisfy low <= high"),
    ("LossSurface.grid", "num", 0, ValueError, "num must be an integer >= 1"),
    ("LossSurfaceDistribution", "s_values", (), ValueError, "s_values must be a non-empty"),
    ("LossSurfaceDistribution", "s_values", (0, 1), ValueError, "s_values must not contain 0"),
    ("LossSurfaceDistribution", "a_values", ("x",), TypeError, "a_values must be a finite"),
    ("LossSurfaceDistribution", "b_values", (1, np.nan), ValueError, "b_values must be a"),
    ("LossSurfaceDistribution", "init_range", (0, np.nan), ValueError, "init_range must be"),
    ("LossSurfaceDistribution", "variant", "valley", ValueError, "variant must be one of"),
    (
        "LossSurfaceDistribution.sample_initial_points",
        "num_points",
        -2,
        ValueError,
        "num_points must be an integer >= 0",
    ),
]

# valid arguments of the synthetic constructors and methods: {target: (factory, kwargs)}
SYNTHETIC = {
    "SineTask": (SineTask, dict(amplitude=1.0, phase=0.0, x_range=(-5.0, 5.0))),
    "SineTaskDistribution": (
        SineTaskDistribution,
        dict(amplitude_range=(0.1, 5.0), phase_range=(0.0, 3.0)),
    ),
    "ContinualSineTask": (
        ContinualSineTask,
        dict(a1=1.0, b1=0.0, a2=2.0, b2=1.0, offset=0.5, num_subtasks=3),
    ),
    "ContinualSineDistribution": (
        ContinualSineDistribution,
        dict(num_subtasks=3, offset_range=(-1, 1)),
    ),
    "LossSurface": (LossSurface, dict(s=2, a=(1, 0, -1), b=(3, -2, 1), variant="paper")),
    "LossSurfaceDistribution": (
        LossSurfaceDistribution,
        dict(s_values=(1, 2), a_values=(0, 1), b_values=(-1, 1), init_range=(-3, 3)),
    ),
}
SYNTHETIC_METHODS = {
    "SineTask.sample": dict(num_points=4, rng=0),
    "SineTask.dataset": dict(batch_size=4, seed=0),
    "SineTaskDistribution.sample_tasks": dict(num_tasks=2, rng=0),
    "ContinualSineTask.training_batches": dict(
        rng=0, steps_per_subtask=2, batch_size=3, order=[2, 0, 1]
    ),
    "LossSurface.grid": dict(limits=(-3.0, 3.0), num=5),
    "LossSurfaceDistribution.sample_initial_points": dict(num_points=3, rng=0),
}


def _call(target, argument, value, small_data, image_root, tmp_path):
    """Calls ``target`` with valid arguments, ``argument=value`` replacing one of them
    (``argument=None``: the valid call itself)."""
    if value is FILE:
        value = tmp_path / "a_file.txt"
        value.write_text("not a folder")
    elif value is MISSING:
        value = tmp_path / "missing"
    override = {} if argument is None else {argument: value}
    if target == "load_omniglot":
        kwargs = dict(
            source="local", data_dir=tmp_path, cache_dir=tmp_path / "cache", image_size=SIDE
        )
        return load_omniglot(**{**kwargs, **override})
    if target.startswith("OmniglotTasks"):
        kwargs = dict(num_classes=2, num_test_per_class=1, num_meta_val=0, num_meta_test=0)
        if target == "OmniglotTasks":
            kwargs = {**kwargs, **override}
            return OmniglotTasks(kwargs.pop("data", small_data), **kwargs)
        sample_kwargs = dict(num_tasks=1, split="train", rng=0, replace=False)
        return OmniglotTasks(small_data, **kwargs).sample(**{**sample_kwargs, **override})
    if target.startswith("EpisodeSampler"):
        kwargs = dict(
            x=np.zeros((30, 4), np.float32),
            y=np.repeat(np.arange(3), 10),
            num_ways=2,
            num_shots=1,
            num_queries=1,
            seed=0,
        )
        if target == "EpisodeSampler":
            return EpisodeSampler(**{**kwargs, **override})
        sampler = EpisodeSampler(**kwargs)
        if target.endswith("sample"):
            return sampler.sample(**override)
        return sampler.dataset(**{"num_episodes": 2, **override})
    if target == "load_image_folder":
        kwargs = dict(root=image_root, mode="L", cache_dir=tmp_path / "cache")
        return load_image_folder(**{**kwargs, **override})
    if target == "rotate_classes":
        kwargs = dict(x=np.zeros((3, 4, 4, 1)), y=np.arange(3), rotations=(0, 1))
        return rotate_classes(**{**kwargs, **override})
    if target in SYNTHETIC:
        factory, kwargs = SYNTHETIC[target]
        return factory(**{**kwargs, **override})
    if target in SYNTHETIC_METHODS:
        owner, method = target.split(".")
        factory, kwargs = SYNTHETIC[owner]
        return getattr(factory(**kwargs), method)(**{**SYNTHETIC_METHODS[target], **override})
    raise AssertionError(target)


@pytest.mark.parametrize(
    "target, argument, value, error, words",
    BAD_ARGUMENTS,
    ids=[f"{t}-{a}-{v!r}"[:60] for t, a, v, _, _ in BAD_ARGUMENTS],
)
def test_bad_loader_argument_is_named(
    target, argument, value, error, words, small_data, image_root, tmp_path
):
    write_folder(tmp_path, omniglot_members())  # a valid local Omniglot copy
    with pytest.raises(error, match=words) as info:
        _call(target, argument, value, small_data, image_root, tmp_path)
    message = str(info.value)
    assert argument in message, message


@pytest.mark.parametrize("target", sorted({t for t, *_ in BAD_ARGUMENTS}))
def test_loader_table_base_call_is_valid(target, small_data, image_root, tmp_path):
    """Each base call of the table succeeds, so every refusal there is due to its one value."""
    write_folder(tmp_path, omniglot_members())
    assert _call(target, None, None, small_data, image_root, tmp_path) is not None


def test_loader_arguments_accept_equivalent_spellings(tmp_path, image_root):
    write_folder(tmp_path / "o", omniglot_members())
    data = load_omniglot(
        "local",
        str(tmp_path / "o"),
        cache_dir=tmp_path / "cache",
        image_size=np.int64(SIDE),
        invert=np.bool_(True),
        tfds_splits="train",
    )
    assert data.images.shape == (6, SIDE, SIDE)
    x, _, _ = load_image_folder(
        str(image_root),
        image_size=(10, 12),
        mode="L",
        cache_dir=tmp_path / "cache",
        extensions=".png",
    )
    assert x.shape == (2, 10, 12, 1)
    x, y = rotate_classes(np.zeros((3, 4, 4, 1)), np.arange(3), rotations=[0, np.int64(1)])
    assert x.shape == (6, 4, 4, 1) and y.tolist() == [0, 2, 4, 1, 3, 5]


@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, ("github.com", 443)),
        ({"https_proxy": "http://proxy.example:3128"}, ("proxy.example", 3128)),
        ({"https_proxy": "proxy.example"}, ("proxy.example", 80)),
        ({"all_proxy": "socks5://10.0.0.1:9050"}, ("10.0.0.1", 9050)),
        (
            {"https_proxy": "http://proxy.example:3128", "no_proxy": "github.com"},
            ("github.com", 443),
        ),
    ],
)
def test_probe_goes_where_the_download_goes(monkeypatch, env, expected):
    for name in (
        "https_proxy",
        "HTTPS_PROXY",
        "all_proxy",
        "ALL_PROXY",
        "no_proxy",
        "NO_PROXY",
        "http_proxy",
        "HTTP_PROXY",
    ):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert omniglot_module._download_route()[:2] == expected
