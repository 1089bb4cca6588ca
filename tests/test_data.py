"""Loading content: folders, arrays, CSV, IDX; clear errors for bad input."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from flipad.io.data import (
    DataError,
    decode_image,
    load_images,
    load_table,
    read_fashion_mnist,
)
from flipad.io.files import fill_once
from flows.datasets import ensure_fashion_mnist, load_fashion_mnist


def _save(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_nested_folder_of_gray_and_rgb_images(tmp_path):
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (3, 8, 8), dtype=np.uint8)
    for i, img in enumerate(gray):
        _save(tmp_path / "gray" / f"sub{i}" / f"{i}.png", img)
    loaded = load_images(tmp_path / "gray")
    assert loaded.shape == (3, 1, 8, 8)
    np.testing.assert_array_equal(loaded[:, 0], gray)
    rgb = rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    for i, img in enumerate(rgb):
        _save(tmp_path / "rgb" / f"{i}.png", img)
    loaded = load_images(tmp_path / "rgb")
    np.testing.assert_array_equal(loaded, rgb.transpose(0, 3, 1, 2))


def test_corrupt_and_mismatched_images_are_named(tmp_path):
    _save(tmp_path / "a.png", np.zeros((8, 8), np.uint8))
    (tmp_path / "b.png").write_bytes(b"not an image at all")
    with pytest.raises(DataError, match="b.png"):
        load_images(tmp_path)
    (tmp_path / "b.png").unlink()
    _save(tmp_path / "c.png", np.zeros((9, 9), np.uint8))
    with pytest.raises(DataError, match="c.png has shape"):
        load_images(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no PNG/JPEG"):
        load_images(tmp_path / "empty")


def test_decode_rejects_oversized_images():
    import io

    buf = io.BytesIO()
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(buf, format="PNG")
    with pytest.raises(DataError, match="exceeds the limit"):
        decode_image(buf.getvalue(), max_pixels=100)


def test_arrays_npy_npz_and_hwc(tmp_path):
    arr = np.random.default_rng(1).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    np.save(tmp_path / "a.npy", arr)
    np.savez(tmp_path / "a.npz", images=arr)
    for name in ("a.npy", "a.npz"):
        np.testing.assert_array_equal(load_images(tmp_path / name), arr.transpose(0, 3, 1, 2))
    floats = np.linspace(0, 1, 16, dtype=np.float32).reshape(1, 1, 4, 4)
    np.save(tmp_path / "f.npy", floats)
    assert load_images(tmp_path / "f.npy").max() == 255


def test_pickled_npy_is_refused(tmp_path):
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="could not be read"):
        load_images(tmp_path / "obj.npy")


def test_csv_with_and_without_header(tmp_path):
    (tmp_path / "h.csv").write_text("a,b,c\n1,2,3\n4,5,6\n")
    (tmp_path / "n.csv").write_text("1,2,3\n4,5,6\n")
    for name in ("h.csv", "n.csv"):
        np.testing.assert_array_equal(load_table(tmp_path / name), [[1, 2, 3], [4, 5, 6]])
    (tmp_path / "bad.csv").write_text("a,b\n1,x\n")
    with pytest.raises(DataError, match="numeric"):
        load_table(tmp_path / "bad.csv")


def test_fashion_mnist_idx():
    images = load_fashion_mnist("test", size=28, limit=10)
    assert images.shape == (10, 1, 28, 28) and images.dtype == np.uint8
    resized = read_fashion_mnist(ensure_fashion_mnist(), "test", size=32, limit=10)
    assert resized.shape == (10, 1, 32, 32)
    assert (images == 0).mean() > 0.3  # Fashion-MNIST backgrounds are black


def test_a_cache_is_fetched_once_by_concurrent_callers_and_never_left_partial(tmp_path):
    fills = []

    def fill(folder):
        fills.append(folder)
        (folder / "a").write_text("1")
        time.sleep(0.3)  # the others wait at the lock meanwhile
        (folder / "b").write_text("2")

    def complete(folder):
        return (folder / "a").is_file() and (folder / "b").is_file()

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(lambda _: fill_once(tmp_path / "cache", complete, fill), range(4)))
    assert len(fills) == 1 and sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["a", "b"]

    def broken(folder):  # a download that fails half-way
        (folder / "a").write_text("1")
        raise OSError("connection reset")

    with pytest.raises(OSError, match="connection reset"):
        fill_once(tmp_path / "other", complete, broken)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".cache.lock", ".other.lock", "cache"]
    (tmp_path / "named").mkdir()  # a folder the user named and created: filled in place
    assert fill_once(tmp_path / "named", complete, fill) and complete(tmp_path / "named")
