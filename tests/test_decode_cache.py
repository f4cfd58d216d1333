"""The cache of decoded tensor-resident splits: the next process loads what the first decoded, never a stale file."""
import os
import time

import pytest
import torch
from PIL import Image

from lightning_kd.data import ImageFolderDataModule
from lightning_kd.data.tensor_resident import TensorImageDataset
from tiny_data import write_tiny_image_folder


def data_module(root, cache, **kwargs) -> ImageFolderDataModule:
    data = ImageFolderDataModule(root, batch_size=4, num_workers=0, tensor_resident=True, decode_cache=str(cache),
                                 **kwargs)
    data.setup("fit")
    return data


def decoded(data: ImageFolderDataModule) -> tuple[torch.Tensor, torch.Tensor]:
    split = data.train_dataset.dataset
    return split.images, split.targets


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "images"
    write_tiny_image_folder(str(root), classes=3, per_class=4)
    return root


def cache_files(cache) -> list[str]:
    directory = os.path.join(cache, "decoded")
    return sorted(os.listdir(directory)) if os.path.isdir(directory) else []


def test_the_next_module_loads_the_decoded_splits_without_decoding(folder, tmp_path, monkeypatch):
    first = data_module(folder, tmp_path / "cache")
    assert len(cache_files(tmp_path / "cache")) == 2 and not any(".tmp-" in f for f in cache_files(tmp_path / "cache"))

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again although the cache holds this split")

    monkeypatch.setattr(TensorImageDataset, "decode", no_decoding)
    second = data_module(folder, tmp_path / "cache")
    for ours, theirs in zip(decoded(first), decoded(second)):
        assert torch.equal(ours, theirs)
    assert torch.equal(first.test_dataset.dataset.images, second.test_dataset.dataset.images)


def test_a_changed_image_is_decoded_again(folder, tmp_path):
    first = data_module(folder, tmp_path / "cache")
    class_dir = sorted((folder / "train").iterdir())[0]
    image_path = sorted(class_dir.iterdir())[0]
    time.sleep(0.01)  # a later modification time, whatever the file system's resolution
    Image.new("RGB", (32, 32), (255, 0, 0)).save(image_path)
    second = data_module(folder, tmp_path / "cache")
    images, _ = decoded(second)
    assert not torch.equal(decoded(first)[0], images)  # the new pixels, not the cached ones
    red = torch.tensor([255, 0, 0], dtype=torch.uint8)[:, None, None]
    assert (images == red).flatten(1).all(dim=1).sum() == 1  # the rewritten image, decoded
    assert len(cache_files(tmp_path / "cache")) == 3  # the old training split's file, the new one, the test split


def test_an_unreadable_cache_file_is_replaced_with_a_warning(folder, tmp_path):
    first = data_module(folder, tmp_path / "cache")
    for name in cache_files(tmp_path / "cache"):
        with open(os.path.join(tmp_path / "cache", "decoded", name), "wb") as handle:
            handle.write(b"truncated")
    with pytest.warns(UserWarning, match="is unreadable"):
        second = data_module(folder, tmp_path / "cache")
    assert torch.equal(decoded(first)[0], decoded(second)[0])
    third = data_module(folder, tmp_path / "cache")  # the replaced file now loads
    assert torch.equal(decoded(first)[0], decoded(third)[0])


def test_another_decode_size_is_another_cache_entry(folder, tmp_path):
    small = data_module(folder, tmp_path / "cache", image_size=16)
    large = data_module(folder, tmp_path / "cache", image_size=32)
    assert decoded(small)[0].shape[-1] == 16 and decoded(large)[0].shape[-1] == 32
    assert len(cache_files(tmp_path / "cache")) == 4


def test_no_cache_when_switched_off(folder, tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_KD_CACHE", str(tmp_path / "default"))
    ImageFolderDataModule(folder, batch_size=4, num_workers=0, tensor_resident=True, decode_cache=False).setup("fit")
    assert not os.path.exists(tmp_path / "default")
    ImageFolderDataModule(folder, batch_size=4, num_workers=0, tensor_resident=True).setup("fit")
    assert len(cache_files(tmp_path / "default")) == 2  # True (the default): $LIGHTNING_KD_CACHE


def test_an_unwritable_cache_directory_warns_and_the_data_still_loads(folder, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.warns(UserWarning, match="Could not write the decoded-image cache"):
        data = data_module(folder, blocker)
    assert len(decoded(data)[0]) > 0
