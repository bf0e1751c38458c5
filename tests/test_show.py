"""`python -m ssl_kit show` and its pictures: PCA of patch features, t-SNE, reconstructions, attention.

Every picture is drawn from a tiny model on real PNG/JPEG files and checked for its size and for
content that is not constant; the CLI runs as a subprocess for the user-facing paths.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from sklearn.datasets import load_digits

from ssl_kit.evaluators.knn_job import EvalData, EvalTrainer
from ssl_kit.pictures import ReportInputs, patch_features, pca_rgb, write_report
from ssl_kit.pictures.canvas import font
from ssl_kit.show import show
from ssl_kit.views import EvalTransform

from conftest import TINY_MAE, assert_ok, run_cli

TILE, PAD, N_SHOWN = 64, 2, 4


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """Three digit classes, 8 images each, upsampled to 32 px RGB: PNG for even, JPEG for odd images."""
    root = tmp_path_factory.mktemp("digits")
    digits = load_digits()
    for label in range(3):
        (root / str(label)).mkdir()
        picks = np.flatnonzero(digits.target == label)[:8]
        for i, idx in enumerate(picks):
            img = Image.fromarray((digits.images[idx] * 255 / 16).astype(np.uint8)).resize((32, 32), Image.BICUBIC)
            img.convert("RGB").save(root / str(label) / f"{i}.{'png' if i % 2 == 0 else 'jpg'}")
    return root


def tiles_of_row(png, row_from_bottom: int, cols: int = N_SHOWN) -> np.ndarray:
    """Pixels of the tiles of one row of a labelled grid (0 = bottom row), label column excluded.

    Shapes:
        returns (TILE, cols * (TILE + PAD), 3)
    """
    arr = np.asarray(Image.open(png).convert("RGB"))
    bottom = arr.shape[0] - PAD - row_from_bottom * (TILE + PAD)
    return arr[bottom - TILE:bottom, arr.shape[1] - cols * (TILE + PAD):]


def assert_grid(png, rows: int, cols: int = N_SHOWN) -> None:
    """Size of a labelled grid of ``rows`` x ``cols`` tiles with an 18 px title."""
    w, h = Image.open(png).size
    assert h == 18 + rows * (TILE + PAD) + PAD, (png, h)
    assert w > cols * (TILE + PAD) and w < cols * (TILE + PAD) + 200, (png, w)


def not_constant(pixels: np.ndarray, min_colours: int = 3) -> None:
    """Each tile of the row varies, and the row holds several colours."""
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) >= min_colours
    for c in range(pixels.shape[1] // (TILE + PAD)):
        tile = pixels[:, c * (TILE + PAD):c * (TILE + PAD) + TILE]
        assert tile.std() > 1.0, f"tile {c} is constant"


def report(tmp_path, inputs: ReportInputs) -> dict:
    write_report(tmp_path, inputs, num_images=N_SHOWN, max_points=50)
    return {p.name: p for p in tmp_path.iterdir()}


def folder_dataset(image_folder, size: int):
    data = EvalData(dataset="folder", root=str(image_folder), val_fraction=0.0)
    return data.split("train", EvalTransform(size)), data.classes()


# --- PCA -----------------------------------------------------------------------------------------

def test_pca_of_an_image_with_two_different_halves_gives_two_colours():
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, num_classes=0).eval()
    img = torch.full((3, 32, 32), -1.5)
    img[:, :, 16:] = 1.5  # left half dark, right half bright: 8x8 patches, 4 columns each side
    imgs = torch.stack([img, img.flip(-1)])  # and its mirror, so the location centring keeps the contrast
    with torch.no_grad():
        rgb = pca_rgb(patch_features(vit, imgs))  # (2, 3, 8, 8)
    left, right = rgb[0, :, :, :4].flatten(1), rgb[0, :, :, 4:].flatten(1)  # (3, 32) each
    assert (left - left.mean(1, keepdim=True)).abs().max() < 0.1  # one colour per half
    assert (right - right.mean(1, keepdim=True)).abs().max() < 0.1
    assert (left.mean(1) - right.mean(1)).norm() > 0.5  # two distinct colours
    assert torch.allclose(rgb[1], rgb[0].flip(-1), atol=0.1)  # the mirror gets the mirrored map


def test_pca_follows_content_not_position():
    """Features = position code + content: the position share is removed before the components."""
    g = torch.Generator().manual_seed(0)
    position = 10 * torch.randn(1, 16, 6, 6, generator=g)  # large, the same in every image
    content = torch.randn(16, generator=g)
    masks = (torch.rand(8, 1, 6, 6, generator=g) > 0.5).float()  # which cells show the content
    rgb = pca_rgb(position + masks * content[None, :, None, None])  # (8, 3, 6, 6)
    first = rgb[:, 0]  # (8, 6, 6): the first component, red
    on, off = first[masks[:, 0] > 0], first[masks[:, 0] == 0]
    # each location's mean is removed, so a cell's value also depends on how many images show the
    # content there, but every cell showing it lies on one side of every cell that does not
    assert on.min() > off.max() or off.min() > on.max(), (on, off)
    assert (on.mean() - off.mean()).abs() > 0.5


# --- every picture from tiny models ----------------------------------------------------------------

def test_vit_mae_pictures(tmp_path, image_folder, tiny_mae):
    dataset, classes = folder_dataset(image_folder, 32)
    files = report(tmp_path, ReportInputs(encoder=tiny_mae.encoder, dataset=dataset, encode=tiny_mae.extract_features,
                                          classes=classes, reconstructor=tiny_mae.eval()))
    assert sorted(files) == ["attention.png", "embedding.png", "pca.png", "reconstructions.png", "report.html"]
    assert_grid(files["pca.png"], rows=2)
    not_constant(tiles_of_row(files["pca.png"], 0))
    heads = tiny_mae.encoder.blocks[-1].attn.num_heads
    assert_grid(files["attention.png"], rows=1 + heads)
    for head in range(heads):
        not_constant(tiles_of_row(files["attention.png"], head))
    assert_grid(files["reconstructions.png"], rows=3)
    recon, masked = tiles_of_row(files["reconstructions.png"], 1), tiles_of_row(files["reconstructions.png"], 2)
    not_constant(recon)
    grey = (masked == 128).all(-1).mean()  # removed patches drawn grey: 75% of the area
    assert 0.6 < grey < 0.8, grey
    assert Image.open(files["embedding.png"]).size[1] == 420 + 32
    html = files["report.html"].read_text()
    assert all(f"src='{name}'" in html for name in files if name.endswith(".png"))


def test_embedding_colours_every_class(tmp_path, image_folder):
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=0).eval()
    dataset, classes = folder_dataset(image_folder, 32)
    files = report(tmp_path, ReportInputs(encoder=model, dataset=dataset, classes=classes))
    assert sorted(files) == ["embedding.png", "pca.png", "report.html"]  # no attention, no reconstructions
    arr = np.asarray(Image.open(files["embedding.png"]).convert("RGB"))[22:, :430]  # the scatter, no legend
    from ssl_kit.pictures.canvas import label_colour

    for label in range(3):
        hits = (arr == np.array(label_colour(label), np.uint8)).all(-1).sum()
        assert hits > 25, f"class {label}: {hits} pixels"  # a dot is ~30 px; the 8 of a class may overlap
    legend = max(int(font(12).getlength(c)) for c in classes) + 28
    assert Image.open(files["embedding.png"]).size == (420 + 20 + legend, 420 + 32)
    # a ResNet at 32 px has a 1x1 final map: the PCA input is enlarged to give 8x8 cells
    assert_grid(files["pca.png"], rows=2)
    not_constant(tiles_of_row(files["pca.png"], 0))
    assert "8x8 locations of 512-d features at 256 px input" in files["report.html"].read_text()


def test_fcmae_convnext_pictures(tmp_path, image_folder):
    from ssl_kit.methods import FCMAE

    torch.manual_seed(0)
    model = FCMAE(model_name="convnextv2_atto", img_size=64, decoder_embed_dim=32).eval()
    dataset, classes = folder_dataset(image_folder, 64)
    files = report(tmp_path, ReportInputs(encoder=model.encoder, dataset=dataset, encode=model.extract_features,
                                          classes=classes, reconstructor=model))
    assert sorted(files) == ["embedding.png", "pca.png", "reconstructions.png", "report.html"]
    for name, rows in (("pca.png", 2), ("reconstructions.png", 3)):
        assert_grid(files[name], rows=rows)
    not_constant(tiles_of_row(files["pca.png"], 0))
    not_constant(tiles_of_row(files["reconstructions.png"], 1))


# --- every encoder kind through show() -------------------------------------------------------------

def _ssl_kit_mae_checkpoint(tmp_path):
    import pytorch_lightning as pl

    from ssl_kit.data import SSLDataModule
    from ssl_kit.methods import MAE

    torch.manual_seed(0)
    model = MAE(**TINY_MAE)
    dm = SSLDataModule(dataset="synthetic", synthetic_size=8, batch_size=4, num_workers=0)
    trainer = pl.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path, enable_checkpointing=False)
    trainer.fit(model, dm)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    return tmp_path / "last.ckpt"


def test_show_for_every_encoder_kind(tmp_path, image_folder):
    from ssl_kit.export import export

    from test_load_encoder import official_mae_state

    ckpt = _ssl_kit_mae_checkpoint(tmp_path / "run")
    (tmp_path / "run" / "eval.json").write_text(json.dumps(
        {"protocol": {"k": 20, "temperature": 0.07}, "pretrained": {"knn": {"top1": 12.5, "top5": 50.0}}}))
    official = tmp_path / "mae_pretrain_vit_tiny.pth"
    torch.save({"model": official_mae_state(load_ssl_kit_encoder(ckpt))}, official)
    sources = {"ssl_kit": str(ckpt), "file": str(export(str(ckpt), str(tmp_path / "enc.safetensors"))),
               "folder": str(export(str(ckpt), str(tmp_path / "enc_dir") + "/")), "official": str(official),
               "timm": "vit_tiny_patch16_224"}
    for kind, source in sources.items():
        data = EvalData(dataset="folder", root=str(image_folder), val_fraction=0.25, num_workers=0)
        page = show(encoder=source, data=data, output=str(tmp_path / kind), num_images=N_SHOWN, max_points=20,
                    img_size=32 if kind in ("official", "timm") else None, trainer=EvalTrainer("cpu"))
        names = sorted(p.name for p in page.parent.iterdir())
        expected = ["attention.png", "embedding.png", "pca.png", "report.html"]
        assert names == sorted(expected + ["reconstructions.png"] * (kind == "ssl_kit")), kind
        not_constant(tiles_of_row(page.parent / "pca.png", 0))
        html = page.read_text()
        assert ("12.50 / 50.00" in html) == (kind == "ssl_kit"), kind  # eval.json beside the checkpoint


def load_ssl_kit_encoder(ckpt):
    from ssl_kit.checkpoints import load_encoder

    return load_encoder(ckpt)


# --- the CLI ----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_show_cli_writes_the_report_and_refuses_bad_input(tmp_path, image_folder):
    ckpt = _ssl_kit_mae_checkpoint(tmp_path / "run")
    out = tmp_path / "report"
    proc = run_cli("show", "--encoder", str(ckpt), "--data.root", str(image_folder), "--output", str(out),
                   "--num_images", "4", "--max_points", "20", "--data.num_workers", "0", "--trainer.accelerator", "cpu")
    assert_ok(proc)
    assert f"report written to {out / 'report.html'}" in proc.stdout
    assert "features" in proc.stderr  # the progress bar of the feature extraction
    for name in ("pca.png", "embedding.png", "attention.png", "reconstructions.png", "report.html"):
        assert (out / name).stat().st_size > 0, name

    before = sorted(p.name for p in out.iterdir())
    empty = tmp_path / "empty"
    empty.mkdir()
    for args, what in ((["--encoder", str(tmp_path / "missing.ckpt"), "--data.root", str(image_folder)],
                        "missing.ckpt' does not exist"),
                       (["--encoder", str(ckpt), "--data.root", str(empty)], "holds no images")):
        proc = run_cli("show", *args, "--output", str(out))
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and what in lines[0], proc.stderr
    assert sorted(p.name for p in out.iterdir()) == before  # the earlier report is untouched


def test_show_spells_the_accelerator_as_fit_and_knn_do(tmp_path):
    """``--trainer.accelerator`` (fit's and knn's flag); a bad value, more than one process or the
    old ``--accelerator`` is one error line, exit code 2, before the report folder is made."""
    out = tmp_path / "report"
    for flags, what in ((["--trainer.accelerator", "tpu"], "trainer.accelerator='tpu' is not allowed"),
                        (["--trainer.devices", "2"], "show runs in one process"),
                        (["--accelerator", "cpu"], "unrecognized arguments: --accelerator")):
        proc = run_cli("show", "--encoder", "vit_tiny_patch16_224", "--data.dataset", "digits", "--output", str(out),
                       *flags)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and what in lines[0], proc.stderr
    assert not out.exists()
