import pytest
import torch
from PIL import Image

from ssl_kit.data import Digits, ImageFolder, SSLDataModule, SyntheticImages
from ssl_kit.views import EvalTransform


def _write_images(root, layout):
    for rel in layout:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (20, 16), color=(len(rel) * 7 % 255, 30, 60)).save(path)


def test_image_folder_with_class_subfolders(tmp_path):
    _write_images(tmp_path, ["cat/a.jpg", "cat/deep/b.png", "dog/c.webp", "dog/d.JPEG"])
    ds = ImageFolder(str(tmp_path))
    assert ds.classes == ["cat", "dog"]
    assert sorted(ds.labels) == [0, 0, 1, 1]
    assert ds.load(0).mode == "RGB" and ds.has_labels


def test_image_folder_without_classes_is_unlabelled(tmp_path):
    _write_images(tmp_path, ["a.jpg", "sub/b.png"])
    ds = ImageFolder(str(tmp_path))
    assert len(ds) == 2 and not ds.has_labels


def test_unreadable_image_error_names_the_file(tmp_path):
    _write_images(tmp_path, ["a.jpg"])
    (tmp_path / "broken.png").write_bytes(b"not an image")
    ds = ImageFolder(str(tmp_path))
    with pytest.raises(OSError, match="broken.png"):
        [ds.load(i) for i in range(len(ds))]


def test_digits_are_bundled_rgb_and_split_is_fixed():
    ds = Digits(size=32)
    assert len(ds) == 1797 and ds.load(0).size == (32, 32) and ds.load(0).mode == "RGB"
    a, b = SSLDataModule(dataset="digits"), SSLDataModule(dataset="digits")
    assert a.split("val", None).subset.indices == b.split("val", None).subset.indices
    assert len(a.split("val", None)) == 359 and len(a.split("train", None)) == 1438
    assert not set(a.split("val", None).subset.indices) & set(a.split("train", None).subset.indices)


def test_synthetic_is_deterministic():
    a, b = SyntheticImages(8, size=16), SyntheticImages(8, size=16)
    assert list(a.load(3).getdata()) == list(b.load(3).getdata())


def test_eval_loader_yields_labelled_normalised_tensors():
    dm = SSLDataModule(dataset="synthetic", synthetic_size=10, batch_size=4, num_workers=0)
    dm.set_transforms(None, EvalTransform(32))
    imgs, labels = next(iter(dm.eval_dataloader("train")))
    assert imgs.shape == (4, 3, 32, 32) and labels.dtype == torch.int64


@pytest.mark.parametrize("kwargs, message", [
    (dict(dataset="folder"), "needs data.root"),
    (dict(dataset="digits", val_fraction=1.0), "val_fraction=1.0"),
    (dict(dataset="digits", batch_size=0), "batch_size=0"),
])
def test_bad_data_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SSLDataModule(**kwargs)


def test_seeded_transform_draws_as_torch_manual_seed_and_restores_the_caller_rng():
    """The fast per-sample seeding (default generator, not torch.manual_seed) gives the same views
    as seeding torch and Python globally, and leaves the caller's RNG streams where they were."""
    import random

    from ssl_kit.data.datamodule import _seeded
    from ssl_kit.views import MaskedImageTransform

    img = Digits(32).load(3)
    t = MaskedImageTransform(32, scale=(0.2, 1.0))
    torch.manual_seed(123), random.seed(123)
    before = (torch.rand(1), random.random())
    torch.manual_seed(123), random.seed(123)
    views = [_seeded(s, t, img) for s in (7, 8, 7)]
    assert (torch.rand(1), random.random()) == before  # caller streams untouched
    torch.manual_seed(7), random.seed(7)
    assert torch.equal(views[0], t(img)) and torch.equal(views[0], views[2])
    assert not torch.equal(views[0], views[1])
