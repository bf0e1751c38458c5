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


# --- the training sampler across ranks ---------------------------------------------------------
def _batches(sampler, batch_size: int) -> list[list[int]]:
    indices = [i for i, _ in sampler]
    return [indices[k : k + batch_size] for k in range(0, len(indices) - batch_size + 1, batch_size)]


def test_resumable_sampler_two_ranks_split_the_one_process_batches():
    """2 ranks x batch 2 train, step by step, exactly the batches of 1 process x batch 4: disjoint,
    together the epoch's permutation in order; per-sample seeds do not depend on the rank."""
    from ssl_kit.data import ResumableSampler
    from ssl_kit.data.sampler import sample_seed

    n, b, seed, epoch = 23, 2, 5, 3
    ranks = [ResumableSampler(range(n), b, num_replicas=2, rank=r, seed=seed, position=lambda: (epoch, 0))
             for r in range(2)]
    one = ResumableSampler(range(n), 2 * b, seed=seed, position=lambda: (epoch, 0))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    rank_batches = [_batches(s, b) for s in ranks]
    assert len(rank_batches[0]) == len(rank_batches[1]) == len(ranks[0]) // b == 5  # 22 usable = 2 x 11
    steps = list(zip(*rank_batches))
    assert [r0 + r1 for r0, r1 in steps] == _batches(one, 2 * b)[: len(steps)]
    assert [i for r0, r1 in steps for i in r0 + r1] == perm[: 2 * b * len(steps)]  # the permutation prefix
    seen = [[i for i, _ in s] for s in ranks]
    assert len(seen[0]) == len(seen[1]) == 11 and not set(seen[0]) & set(seen[1])  # disjoint
    assert all(s == sample_seed(seed, epoch, i) for sampler in ranks for i, s in sampler)


def test_resumable_sampler_resumes_mid_epoch_on_every_rank():
    """Restarted after 3 trained steps, each rank continues with its own 4th batch."""
    from ssl_kit.data import ResumableSampler

    full = [list(ResumableSampler(range(30), 2, num_replicas=2, rank=r, seed=1, position=lambda: (2, 0)))
            for r in range(2)]
    resumed = [list(ResumableSampler(range(30), 2, num_replicas=2, rank=r, seed=1, position=lambda: (2, 3)))
               for r in range(2)]
    for r in range(2):
        assert resumed[r] == full[r][3 * 2:], r
    assert resumed[0][:2] != resumed[1][:2]
