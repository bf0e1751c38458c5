"""WebDataset shards: the converter, disjoint streams per rank and worker, exact resume, every method
through the CLI, labels for evaluators, and bad shards. Every shard here is a real tar file written
by the test (mostly by ``python -m ssl_kit shard``)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, assert_ok, run_cli
from method_zoo import ZOO, cli_args
from ssl_kit.data import ImageFolder, SSLDataModule
from ssl_kit.data.sampler import sample_seed
from ssl_kit.data.shard_stream import ShardLoader, ShardStream
from ssl_kit.data.shard_writer import FolderSource, shard
from ssl_kit.data.shards import ShardSamples

CLASSES = ("ant", "bee", "cat")


def write_folder(root: Path, per_class: int = 8, size=(40, 32), first: int = 0) -> Path:
    """JPEGs in class sub-folders, each image distinct (class colour + per-image stripes and noise)."""
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(first, first + per_class):
            rng = np.random.default_rng((c, i))
            yy, xx = np.mgrid[0 : size[1], 0 : size[0]]
            base = np.array([60 + 70 * c, 200 - 60 * c, 40 + 50 * (i % 4)], dtype=float)
            img = base + 50 * np.sin(xx * (0.2 + 0.05 * i) + yy * 0.1 * c)[..., None] + rng.normal(0, 8, (*size[::-1], 3))
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / name / f"img{i}.jpg", quality=90)
    return root


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """24 JPEGs in 3 classes -> 3 shards of 8 (shuffled): (folder, shard folder, brace pattern)."""
    tmp = tmp_path_factory.mktemp("shards")
    folder = write_folder(tmp / "images")
    summary = shard(data=FolderSource(str(folder)), output=str(tmp / "out"), shard_size=8)
    return folder, tmp / "out", summary["pattern"]


def ids_transform(img) -> int:
    """A 'view' that is the sample's number (the converter's keys are the sample numbers)."""
    return int(img.info["key"])


def stream_batches(data, workers=0, position=(0, 0), world_size=1, rank=0, batch_size=4, seed=3, buffer=5,
                   seeded=lambda seed, fn, img: fn(img), transform=ids_transform):
    stream = ShardStream(data, range(len(data)), transform, seeded, batch_size=batch_size,
                         world_size=world_size, rank=rank, workers=workers, seed=seed, shuffle_buffer=buffer)
    return [b.tolist() for b, _ in ShardLoader(stream, lambda: position, num_workers=workers)], stream


# --- the converter ------------------------------------------------------------------------------------
def test_shards_hold_the_original_bytes_and_labels(shards):
    folder, out, pattern = shards
    images = ImageFolder(str(folder))
    data = ShardSamples(pattern)
    assert json.loads((out / "sizes.json").read_text()) == {f"train-{k:06d}.tar": 8 for k in range(3)}
    assert len(data) == 24 and data.has_labels and data.classes == ["0", "1", "2"]
    by_relpath = {f.relative_to(folder).as_posix(): (f, images.labels[i]) for i, f in enumerate(images.files)}
    seen, classes_per_shard = set(), []
    for k in range(3):
        with tarfile.open(out / f"train-{k:06d}.tar") as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar}
        classes_per_shard.append(set())
        for name, payload in members.items():
            if name.endswith(".json"):
                meta = json.loads(payload)
                src, label = by_relpath[meta["relpath"]]
                key = name[: -len(".json")]
                assert members[f"{key}.jpg"] == src.read_bytes()  # stored as is, not re-encoded
                assert int(members[f"{key}.cls"]) == label == meta["label"] and CLASSES[label] == meta["class"]
                assert data.labels[int(key)] == label  # ShardSamples reads the cls member
                seen.add(meta["relpath"])
                classes_per_shard[-1].add(label)
    assert seen == set(by_relpath)  # every image exactly once
    assert all(len(c) > 1 for c in classes_per_shard)  # shuffled: shards mix classes


@pytest.mark.slow
def test_shard_job_interrupted_then_resumed(tmp_path):
    """A real `python -m ssl_kit shard` process is killed while writing its second shard (it blocks
    reading a FIFO); started again it keeps the complete first shard untouched and finishes."""
    folder = write_folder(tmp_path / "images", per_class=7)
    os.remove(folder / "bee" / "img6.jpg")
    fifo = folder / "bee" / "img6.jpg"  # sorted position 13: in shard 1 with shard_size 10
    os.mkfifo(fifo)
    out = tmp_path / "out"
    args = ["shard", "--data.root", str(folder), "--output", str(out), "--shard_size", "10", "--shuffle", "false"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    first = subprocess.Popen([sys.executable, "-m", "ssl_kit", *args], env=env, cwd=tmp_path,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while not (out / ".train-000001.tar.tmp").exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    first.kill()
    first.wait()
    assert (out / "train-000000.tar").is_file() and not (out / "train-000001.tar").exists()
    assert not (out / "sizes.json").exists()
    kept = (out / "train-000000.tar").stat()

    second = subprocess.Popen([sys.executable, "-m", "ssl_kit", *args], env=env, cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    payload = (folder / "bee" / "img5.jpg").read_bytes()
    with open(fifo, "wb") as f:  # blocks until the new run reads the image
        f.write(payload)
    stdout, stderr = second.communicate(timeout=120)
    assert second.returncode == 0, stderr
    assert "wrote 2, kept 1 complete" in stdout
    assert (out / "train-000000.tar").stat().st_mtime_ns == kept.st_mtime_ns  # skipped, not rewritten
    data = ShardSamples(str(out))
    assert len(data) == 21 and data.sizes == [10, 10, 1]
    assert [data.labels[i] for i in range(21)] == [0] * 7 + [1] * 7 + [2] * 7
    with tarfile.open(out / "train-000001.tar") as tar:
        assert tar.extractfile("000000013.jpg").read() == payload

    changed = run_cli(*args[:5], "--shard_size", "5", *args[7:], cwd=tmp_path)  # another job, same folder
    assert changed.returncode == 2 and "holds shards of another conversion (shard_size differ" in changed.stderr


def test_pipe_and_fsspec_shards_read_like_local_files(shards):
    """The same shards through `pipe:cat ...` (streamed, counted from the headers) and an fsspec
    URL (memory://, with its sizes.json) give the same epoch; single samples need seekable shards."""
    import fsspec

    _, out, pattern = shards
    local = ShardSamples(pattern)
    piped = ShardSamples(f"pipe:cat {out}/train-{{000000..000002}}.tar")
    memory = fsspec.filesystem("memory")
    for path in out.iterdir():
        memory.pipe(f"/wds/{path.name}", path.read_bytes())
    remote = ShardSamples("memory://wds/train-{000000..000002}.tar")
    assert piped.sizes == remote.sizes == [8, 8, 8]
    expected, _ = stream_batches(local, workers=2)
    for data in (piped, remote):
        assert stream_batches(data, workers=2)[0] == expected
    img, ref = remote.load(5), local.load(5)
    assert np.array_equal(np.asarray(img), np.asarray(ref)) and img.info["relpath"] == ref.info["relpath"]
    assert ref.info["relpath"].split("/")[0] in CLASSES  # the original path, from the json member
    with pytest.raises(OSError, match="needs a seekable shard"):
        piped.load(0)
    with pytest.raises(ValueError, match="validation split .*pipe: shards are streamed"):  # refused at start
        SSLDataModule(dataset="shards", root=f"pipe:cat {out}/train-{{000000..000002}}.tar", val_fraction=0.2).check()


# --- streams: disjoint shards, order, resume -----------------------------------------------------
def test_ranks_and_workers_read_disjoint_shards_and_every_sample_once(shards):
    data = ShardSamples(shards[2])
    for world_size, workers in [(1, 0), (1, 2), (3, 1)]:
        epoch, readers = [], []
        for rank in range(world_size):
            batches, stream = stream_batches(data, workers=workers, world_size=world_size, rank=rank)
            assert len(batches) == stream.steps == 24 // 4 // world_size
            streams = stream.streams(0)
            readers += [set(s["shards"]) for s in streams]
            for b in batches:  # a batch comes from one worker, which reads only its own shards
                assert any({data.locate(i)[0] for i in b} <= set(s["shards"]) for s in streams)
            epoch += [i for b in batches for i in b]
        assert sorted(epoch) == list(range(24)), (world_size, workers)  # every sample once
        assert sum(len(r) for r in readers) == 3 and set().union(*readers) == {0, 1, 2}  # disjoint shards


def test_order_is_a_function_of_seed_and_epoch(shards):
    data = ShardSamples(shards[2])
    a, _ = stream_batches(data, workers=2)
    b, _ = stream_batches(data, workers=2)
    c, _ = stream_batches(data, workers=2, position=(1, 0))
    d, _ = stream_batches(data, workers=2, seed=4)
    assert a == b and a != c and a != d
    assert sorted(sum(a, [])) == sorted(sum(c, [])) == list(range(24))
    _, stream = stream_batches(data, workers=2)
    dealt = {tuple(tuple(s["shards"]) for s in stream.streams(epoch)) for epoch in range(6)}
    assert len(dealt) > 1  # the shards are dealt to the workers anew each epoch


@pytest.mark.parametrize("workers", [0, 2])
def test_mid_epoch_resume_neither_repeats_nor_skips(shards, workers):
    """Restarted after k batches (any k), the loader yields exactly the rest of the epoch, in order;
    with 2 workers the resumed epoch starts at the worker whose turn it is."""
    data = ShardSamples(shards[2])
    full, stream = stream_batches(data, workers=workers, position=(2, 0))
    for done in range(1, stream.steps):
        resumed, _ = stream_batches(data, workers=workers, position=(2, done))
        assert resumed == full[done:], done


def test_views_do_not_depend_on_workers(shards):
    """Each sample is augmented under sample_seed(seed, epoch, index), whatever stream reads it."""
    data = ShardSamples(shards[2])
    seeds = {}
    for workers in (0, 2):
        batches, _ = stream_batches(data, workers=workers, seeded=lambda seed, fn, img: torch.tensor([fn(img), seed]))
        for b in batches:
            for index, seed in b:
                assert seeds.setdefault(index, seed) == seed == sample_seed(3, 0, index)
    assert len(seeds) == 24


# --- exact resume through Lightning ----------------------------------------------------------------
def _fit(pattern: str, run_dir: Path, seed: int, workers: int, ckpt_path=None, crash_at=None) -> Path:
    """test_resume's tiny MAE run (constant lr, 2 epochs), from the shards, last.ckpt every 2 steps."""
    from test_resume import fit

    return fit("mae", run_dir, seed, ckpt_path=ckpt_path, crash_at=crash_at, every_n_train_steps=2,
               workers=workers, data=dict(dataset="shards", root=pattern, shuffle_buffer=5))


@pytest.mark.slow
def test_mae_resume_on_shards_is_bitwise(tmp_path):
    """12 images in 3 shards of 4, 2 loader workers (3 steps per epoch, 2 epochs). Killed at step 5
    (last.ckpt at step 4, mid-epoch 2) and resumed with a fresh seed: the final checkpoint equals an
    uninterrupted run's bit for bit. Resuming that checkpoint with 1 worker is refused."""
    import shutil

    from test_resume import assert_same, comparable

    from ssl_kit.checkpoints import load_checkpoint

    folder = write_folder(tmp_path / "images", per_class=4)
    pattern = shard(data=FolderSource(str(folder)), output=str(tmp_path / "shards"), shard_size=4)["pattern"]
    reference = load_checkpoint(_fit(pattern, tmp_path / "ref", seed=0, workers=2))
    assert reference["global_step"] == 6
    last = _fit(pattern, tmp_path / "run", seed=0, workers=2, crash_at=5)
    saved = load_checkpoint(last)
    assert saved["global_step"] == 4
    record = saved["SSLDataModule"]["shards"]
    assert record["workers"] == 2 and [s[2] for s in record["streams"]] == [4, 0]  # worker 0 gave 1 batch
    assert record["streams"][0][3] in ShardSamples(pattern).shards  # its shard, and the offset of its block
    shutil.copy(last, tmp_path / "step4.ckpt")
    _fit(pattern, tmp_path / "run", seed=1234, workers=2, ckpt_path=str(last))
    assert_same(comparable(reference), comparable(load_checkpoint(last)))

    with pytest.raises(ValueError, match="cannot resume exactly on shards: workers 2 -> 1"):
        _fit(pattern, tmp_path / "other", seed=0, workers=1, ckpt_path=str(tmp_path / "step4.ckpt"))


# --- every method through the CLI ------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(ZOO))
def test_every_method_trains_two_steps_from_shards(shards, tmp_path, method):
    run_dir = tmp_path / "run"
    proc = run_cli("fit", *cli_args(method), "--data.dataset", "shards", "--data.root", shards[2],
                   "--data.val_fraction", "0", "--data.batch_size", "4", "--data.num_workers", "1",
                   "--trainer.max_steps", "2", "--trainer.max_epochs", "1", "--trainer.accelerator", "cpu",
                   "--trainer.devices", "1", "--trainer.callbacks", "[]", "--trainer.enable_progress_bar", "false",
                   "--checkpoint.save_last", "true", "--trainer.default_root_dir", str(run_dir))
    assert_ok(proc)
    ckpt = torch.load(run_dir / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 2
    record = ckpt["SSLDataModule"]["shards"]  # where each stream goes on (one here: 1 worker)
    assert record["workers"] == 1 and record["streams"][0][3] in ShardSamples(shards[2]).shards


# --- labels for evaluators ------------------------------------------------------------------------------
def test_knn_on_shards_equals_knn_on_the_folder(shards, tmp_path):
    """Labels come from the shards' cls members: k-NN of one encoder with train and val_root as
    shards gives exactly what it gives on the same images as folders."""
    from ssl_kit.cli import main

    folder, _, pattern = shards
    val_folder = write_folder(tmp_path / "val", per_class=6, first=20)
    val_pattern = shard(data=FolderSource(str(val_folder)), output=str(tmp_path / "val_shards"), shard_size=7)["pattern"]
    results = {}
    for kind, root, val_root in (("folder", str(folder), str(val_folder)), ("shards", pattern, val_pattern)):
        out = tmp_path / f"{kind}.json"
        main(["knn", "--encoder", "resnet18", "--img_size", "32", "--k", "[5]", "--trainer.accelerator", "cpu",
              "--data.dataset", kind, "--data.root", root, "--data.val_root", val_root, "--data.num_workers", "0",
              "--data.batch_size", "8", "--output", str(out)])
        results[kind] = json.loads(out.read_text())
    protocol = results["shards"]["protocol"]
    assert (protocol["num_classes"], protocol["num_train"], protocol["num_val"]) == (3, 24, 18)
    assert results["shards"]["knn"] == results["folder"]["knn"]
    assert 0 < results["shards"]["knn"]["5"]["top1"] < 100  # the labels matter


# --- bad shards ---------------------------------------------------------------------------------------------
def _tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path


def _jpeg(colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 32), colour).save(buf, "JPEG")
    return buf.getvalue()


def _not_a_tar(d: Path) -> str:
    (d / "x.tar").write_text("not a tar at all")
    return str(d / "x.tar")


def _cut_tar(d: Path) -> str:
    (d / "cut.tar").write_bytes(_tar(d / "full.tar", {"a.jpg": _jpeg()}).read_bytes()[:1200])
    return str(d / "cut.tar")


@pytest.mark.parametrize("make, message", [
    (lambda d: str(d / "none-{000..003}.tar"), "4 of 4 shards do not exist, e.g. '"),
    (lambda d: str(d / "empty" / "*.tar"), "matches no shard"),
    (_not_a_tar, "x.tar' is not a tar file"),
    (_cut_tar, "cut.tar' is truncated"),
], ids=["no-match", "empty-glob", "not-a-tar", "truncated"])
def test_bad_shards_are_refused_before_training(tmp_path, capsys, make, message):
    from ssl_kit.cli import main

    (tmp_path / "empty").mkdir()
    root = make(tmp_path)
    with pytest.raises(SystemExit) as error:
        main(["fit", "--config", str(REPO / "configs/demo/mae.yaml"), "--data.dataset", "shards", "--data.root", root,
              "--data.bad_images", "error", "--trainer.default_root_dir", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert error.value.code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r" / "last.ckpt").exists()


def test_sample_without_image_is_named_or_skipped(tmp_path):
    members = {}
    for i in range(8):
        if i != 5:
            members[f"s{i}.jpg"] = _jpeg((20 * i, 0, 0))
        members[f"s{i}.cls"] = b"1"
    _tar(tmp_path / "d-0.tar", members)
    strict = ShardSamples(str(tmp_path / "d-0.tar"))
    with pytest.raises(OSError, match=r"d-0.tar.*sample 's5' has no image \(members: cls"):
        stream_batches(strict, batch_size=8, transform=lambda img: 0)

    dm = SSLDataModule(dataset="shards", root=str(tmp_path / "d-0.tar"), val_fraction=0.0, batch_size=8,
                       num_workers=0, bad_images="skip")
    dm.set_transforms(train=lambda img: torch.from_numpy(np.asarray(img).copy()), eval=None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (batch, labels), = list(dm.train_dataloader())
    assert dm.skipped_images == 1 and batch.shape[0] == 8 and labels.tolist() == [1] * 8
    assert any("d-0.tar" in str(w.message) and "'s5'" in str(w.message) for w in caught)


def test_truncated_shard_under_skip_replaces_its_missing_samples(tmp_path):
    """sizes.json promises 8 samples, the tar (cut after 5 of them) holds 5: with skip the epoch
    keeps its length, each missing sample is replaced by a readable one of its block and counted."""
    members = {}
    for i in range(8):
        members[f"s{i}.jpg"] = _jpeg((30 * i, 0, 0))
    full = _tar(tmp_path / "full.tar", members).read_bytes()
    with tarfile.open(tmp_path / "full.tar") as tar:
        cut = tar.getmember("s5.jpg").offset
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "d-0.tar").write_bytes(full[:cut])
    (tmp_path / "d" / "sizes.json").write_text(json.dumps({"d-0.tar": 8}))
    with pytest.warns(UserWarning, match="d-0.tar' is truncated"):
        data = ShardSamples(str(tmp_path / "d"), bad_images="skip")
    strict = ShardStream(data, range(8), ids_transform, lambda seed, fn, img: 0, batch_size=8)
    with pytest.raises(OSError, match="d-0.tar' ended after 5 samples; 8 were expected"):
        list(ShardLoader(strict, lambda: (0, 0)))
    dm = SSLDataModule(dataset="shards", root=str(tmp_path / "d"), val_fraction=0.0, batch_size=8, num_workers=0)
    dm.set_transforms(train=lambda img: torch.tensor(img.getpixel((0, 0))[0]), eval=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (reds, _), = list(dm.train_dataloader())
    assert len(reds) == 8 and dm.skipped_images == 3
    assert len(set(reds.tolist())) == 5  # the 5 samples that exist, 3 of them twice
