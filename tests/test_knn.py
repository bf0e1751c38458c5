"""k-NN: faiss search, weighted voting, the knn job (single process and DDP) and the online callback."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import TINY_MAE, assert_ok, run_cli
from ssl_kit.evaluators.knn import knn_accuracies, knn_accuracy, knn_search, knn_vote
from ssl_kit.evaluators.knn_job import EvalData, knn


def test_faiss_topk_agrees_with_brute_force_torch():
    g = torch.Generator().manual_seed(0)
    bank, queries = torch.randn(2000, 64, generator=g), torch.randn(100, 64, generator=g)
    sims, idx = knn_search(bank, queries, k=50)
    expected = (F.normalize(queries, dim=1) @ F.normalize(bank, dim=1).T).topk(50, dim=1)  # (M, k)
    assert torch.equal(idx, expected.indices)
    assert torch.allclose(sims, expected.values, atol=1e-5)


def test_weighted_vote_matches_hand_computed_scores():
    sims = torch.tensor([[0.9, 0.5, 0.1]])
    labels = torch.tensor([[1, 0, 1]])
    scores = knn_vote(sims, labels, num_classes=3, temperature=0.5)
    # class 0: exp(0.5 / 0.5); class 1: exp(0.9 / 0.5) + exp(0.1 / 0.5); class 2: no neighbour
    expected = torch.tensor([[math.e, math.exp(1.8) + math.exp(0.2), 0.0]])
    assert torch.allclose(scores, expected)


def test_votes_weigh_similarity_not_just_counts():
    # Query on the x axis; one very close class-0 neighbour, two distant class-1 neighbours.
    bank = torch.tensor([[1.0, 0.02], [0.3, 1.0], [0.3, -1.0]])
    bank_labels = torch.tensor([0, 1, 1])
    queries, query_labels = torch.tensor([[1.0, 0.0]]), torch.tensor([0])
    sharp = knn_accuracies(bank, bank_labels, queries, query_labels, ks=[1, 3], temperature=0.07)
    flat = knn_accuracies(bank, bank_labels, queries, query_labels, ks=[3], temperature=100.0)
    assert sharp[1]["top1"] == 100.0 and sharp[3]["top1"] == 100.0  # exp(1/0.07) outweighs 2 * exp(0.29/0.07)
    assert flat[3]["top1"] == 0.0  # nearly equal weights: the majority wins


def test_several_k_from_one_search_equal_separate_runs():
    g = torch.Generator().manual_seed(0)
    bank, queries = torch.randn(300, 16, generator=g), torch.randn(80, 16, generator=g)
    bank_y, query_y = torch.randint(0, 7, (300,), generator=g), torch.randint(0, 7, (80,), generator=g)
    together = knn_accuracies(bank, bank_y, queries, query_y, ks=[200, 1, 20])
    assert list(together) == [1, 20, 200]
    for k, acc in together.items():
        assert acc == knn_accuracy(bank, bank_y, queries, query_y, k=k)


def test_bad_k_and_temperature_are_rejected():
    bank, labels = torch.randn(10, 4), torch.zeros(10, dtype=torch.long)
    with pytest.raises(ValueError, match=r"k=\[11\] is larger than the training set \(10 images\)"):
        knn_accuracies(bank, labels, bank, labels, ks=[5, 11])
    with pytest.raises(ValueError, match=r"k=\[0\]"):
        knn_accuracies(bank, labels, bank, labels, ks=[0])
    with pytest.raises(ValueError, match="temperature=0"):
        knn_accuracies(bank, labels, bank, labels, ks=[3], temperature=0)


# --- the job's input checks (in-process: they fail before any model is built) ------------------
def _folder(root, layout: dict[str, int]) -> str:
    for name, count in layout.items():
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            Image.new("RGB", (8, 8), (i * 20, 0, 0)).save(folder / f"{i}.png")
    return str(root)


def test_job_rejects_unlabelled_data(tmp_path):
    root = tmp_path / "flat"
    root.mkdir()
    for i in range(6):
        Image.new("RGB", (8, 8)).save(root / f"{i}.png")
    with pytest.raises(ValueError, match="k-NN needs labelled images"):
        knn(encoder="resnet18", data=EvalData(root=str(root), num_workers=0), k=[1], output=str(tmp_path / "o.json"))


def test_job_rejects_differing_class_lists(tmp_path):
    train = _folder(tmp_path / "train", {"cat": 3, "dog": 3})
    val = _folder(tmp_path / "val", {"cat": 2, "emu": 2})
    with pytest.raises(ValueError, match=r"class lists.*differ.*only in root \['dog'\].*only in val_root \['emu'\]"):
        knn(encoder="resnet18", data=EvalData(root=train, val_root=val, num_workers=0), k=[1],
            output=str(tmp_path / "o.json"))


def test_job_rejects_k_larger_than_the_training_set(tmp_path):
    data = EvalData(dataset="synthetic", synthetic_size=20, val_fraction=0.5, num_workers=0)
    with pytest.raises(ValueError, match=r"k=\[200\] is larger than the training set \(10 images\)"):
        knn(encoder="resnet18", data=data, k=[1, 200], output=str(tmp_path / "o.json"))


def test_job_rejects_an_unwritable_output_before_any_work(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")  # a file where the output folder should be
    with pytest.raises(ValueError, match="cannot create .* pass --output"):
        knn(encoder="resnet18", data=EvalData(dataset="synthetic", num_workers=0), output=str(blocker / "r.json"))


# --- the job end to end, and its DDP equivalence -----------------------------------------------
@pytest.mark.slow
def test_knn_job_writes_json_and_ddp_equals_single_process(tmp_path):
    common = ["knn", "--config", "eval/knn.yaml", "--encoder", "resnet18", "--img_size", "32",
              "--data.dataset", "synthetic", "--data.synthetic_size", "81", "--data.batch_size", "8",
              "--data.num_workers", "0", "--k", "[1,5,20]", "--trainer.accelerator", "cpu"]
    single = run_cli(*common, "--output", str(tmp_path / "single.json"))
    assert_ok(single)
    assert f"results written to {tmp_path / 'single.json'}" in single.stdout
    one = json.loads((tmp_path / "single.json").read_text())
    assert set(one["knn"]) == {"1", "5", "20"} and one["protocol"]["num_train"] == 65
    assert all(0 <= r["top1"] <= r["top5"] <= 100 for r in one["knn"].values())
    ddp = run_cli(*common, "--trainer.devices", "2", "--output", str(tmp_path / "ddp.json"))
    assert_ok(ddp)
    two = json.loads((tmp_path / "ddp.json").read_text())
    assert two["protocol"]["world_size"] == 2  # 65 train / 16 val: uneven shards over 2 ranks
    assert two["knn"] == one["knn"]
    assert {k: v for k, v in two["protocol"].items() if k != "world_size"} == {
        k: v for k, v in one["protocol"].items() if k != "world_size"}


# --- online k-NN during pretraining -------------------------------------------------------------
def _digits_folder(root, n: int = 40):
    """The first ``n`` bundled digits as class sub-folders: hard enough that k-NN is neither 0 nor
    100% with a random ViT, so a bank or query set that is missing a part shows in the accuracy."""
    from ssl_kit.data import Digits

    digits = Digits(32)
    for i in range(n):
        (root / str(digits.labels[i])).mkdir(parents=True, exist_ok=True)
        digits.load(i).save(root / str(digits.labels[i]) / f"{i}.png")
    return root


def test_extract_features_runs_under_bf16_autocast_only_when_asked():
    """None keeps the old rule (autocast on CUDA only); a bf16-mixed run encodes under bf16."""
    from types import SimpleNamespace

    from torch.utils.data import DataLoader, TensorDataset

    from ssl_kit.evaluators.features import extract_features, runs_bf16

    loader = DataLoader(TensorDataset(torch.randn(4, 3), torch.arange(4)), batch_size=2)

    def encode(x):  # 1 per image where autocast is on
        return torch.full((x.shape[0], 1), float(torch.is_autocast_enabled("cpu")))

    assert extract_features(encode, loader)[0].sum() == 0
    assert extract_features(encode, loader, bf16=False)[0].sum() == 0
    feats, labels = extract_features(encode, loader, bf16=True)
    assert feats.sum() == 4 and feats.dtype == torch.float32 and labels.tolist() == [0, 1, 2, 3]
    assert runs_bf16(SimpleNamespace(precision="bf16-mixed")) is True
    assert runs_bf16(SimpleNamespace(precision="32-true")) is None
    assert runs_bf16(None) is None


def _fit_with_online_knn(tmp_path, digits: bool = False, **trainer_kwargs):
    import pytorch_lightning as pl

    from ssl_kit.callbacks import OnlineKNN
    from ssl_kit.data import SSLDataModule
    from ssl_kit.methods import MAE

    torch.manual_seed(0)
    mae = MAE(**TINY_MAE)
    if digits:
        dm = SSLDataModule(root=str(_digits_folder(tmp_path / "digits")), batch_size=8, num_workers=0)
    else:
        dm = SSLDataModule(dataset="synthetic", synthetic_size=24, batch_size=8, num_workers=0)
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=2, accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path, callbacks=[OnlineKNN(every_n_epochs=1, k=5)], **trainer_kwargs)
    trainer.fit(mae, datamodule=dm)
    return trainer, mae, dm


def test_online_knn_logs_the_accuracy_of_the_current_encoder(tmp_path):
    from ssl_kit.evaluators import extract_features

    trainer, mae, dm = _fit_with_online_knn(tmp_path)
    mae.eval()
    bank, bank_y = extract_features(mae.extract_features, dm.eval_dataloader("train"))
    query, query_y = extract_features(mae.extract_features, dm.eval_dataloader("val"))
    expected = knn_accuracy(bank, bank_y, query, query_y, k=5)
    assert trainer.callback_metrics["knn_top1"].item() == pytest.approx(expected["top1"])
    assert trainer.callback_metrics["knn_top5"].item() == pytest.approx(expected["top5"])


@pytest.mark.slow
def test_online_knn_under_ddp_equals_the_single_process_value(tmp_path):
    """2 processes each encode half of the bank and queries; the logged accuracy is the one a
    single process computes with the same (trained, returned by ddp_spawn) weights."""
    from ssl_kit.evaluators import extract_features

    trainer, mae, dm = _fit_with_online_knn(tmp_path, digits=True, devices=2, strategy="ddp_spawn")
    dm.set_transforms(train=None, eval=mae.eval_transform())  # the spawned processes set up their own copies
    mae.eval()
    bank, bank_y = extract_features(mae.extract_features, dm.eval_dataloader("train"))
    query, query_y = extract_features(mae.extract_features, dm.eval_dataloader("val"))
    expected = knn_accuracy(bank, bank_y, query, query_y, k=5)
    assert 0 < expected["top1"] < 100  # so a missing part of the bank or of the queries would show
    assert trainer.callback_metrics["knn_top1"].item() == pytest.approx(expected["top1"])
    assert trainer.callback_metrics["knn_top5"].item() == pytest.approx(expected["top5"])
