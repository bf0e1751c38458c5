"""Bad images: odd modes become correct RGB; unreadable files follow the ``bad_images`` policy."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from ssl_kit.data import SSLDataModule, open_rgb


def write_images(root) -> dict[str, str]:
    """One file per kind of trouble; returns kind -> file name."""
    root.mkdir(parents=True, exist_ok=True)
    files = {}

    def save(name, img, **kw):
        img.save(root / name, **kw)
        files[name.split(".")[0]] = name

    save("a_gray.png", Image.new("L", (8, 8), 128))
    save("b_cmyk.jpg", Image.new("CMYK", (8, 8), (0, 255, 255, 0)), quality=100)  # pure red in CMYK
    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)  # index 1 is blue
    save("c_palette.png", pal)
    save("d_gray16.png", Image.fromarray(np.full((8, 8), 65535 // 2, dtype=np.uint16)))
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent "red": shows the background
    rgba.putpixel((0, 0), (0, 255, 0, 255))
    save("e_rgba.png", rgba)
    good = Image.new("RGB", (64, 64), (10, 20, 30))
    good.save(root / "f_full.jpg")
    (root / "g_truncated.jpg").write_bytes((root / "f_full.jpg").read_bytes()[:200])
    (root / "h_empty.jpg").write_bytes(b"")
    (root / "i_text.jpg").write_text("this is not an image")
    files.update(f_full="f_full.jpg", g_truncated="g_truncated.jpg", h_empty="h_empty.jpg", i_text="i_text.jpg")
    return files


def test_modes_convert_to_correct_rgb(tmp_path):
    f = write_images(tmp_path)
    px = lambda name, xy=(4, 4): open_rgb(tmp_path / f[name]).getpixel(xy)  # noqa: E731
    for name in ("a_gray", "b_cmyk", "c_palette", "d_gray16", "e_rgba"):
        assert open_rgb(tmp_path / f[name]).mode == "RGB"
    assert px("a_gray") == (128, 128, 128)
    r, g, b = px("b_cmyk")
    assert r > 200 and g < 60 and b < 60
    assert px("c_palette") == (0, 0, 255)
    assert px("d_gray16") == (127, 127, 127)  # 32767 / 65535 scaled, not clipped to 255
    assert px("e_rgba") == (255, 255, 255) and px("e_rgba", (0, 0)) == (0, 255, 0)  # alpha over white


@pytest.mark.parametrize("orientation, rotate", [(3, Image.Transpose.ROTATE_180), (6, Image.Transpose.ROTATE_270),
                                                 (8, Image.Transpose.ROTATE_90)], ids=["180", "90cw", "90ccw"])
def test_exif_orientation_is_applied(tmp_path, orientation, rotate):
    """A real camera-style JPEG: pixels stored sideways plus an EXIF Orientation tag; what the
    data pipeline sees is the upright image."""
    from ssl_kit.data import ImageFolder

    stored = Image.new("RGB", (40, 20), (220, 30, 30))  # stored 40 wide x 20 high: red left half,
    stored.paste((30, 30, 220), (20, 0, 40, 20))  # blue right half
    exif = Image.Exif()
    exif[0x0112] = orientation  # Orientation
    stored.save(tmp_path / "photo.jpg", exif=exif, quality=95)
    upright = np.asarray(stored.transpose(rotate)).astype(int)
    for img in (open_rgb(tmp_path / "photo.jpg"), ImageFolder(str(tmp_path)).load(0)):
        assert img.size == (upright.shape[1], upright.shape[0])
        assert np.abs(np.asarray(img).astype(int) - upright).mean() < 8  # JPEG noise only


@pytest.mark.parametrize("kind", ["g_truncated", "h_empty", "i_text"])
def test_unreadable_file_error_names_it(tmp_path, kind):
    f = write_images(tmp_path)
    with pytest.raises(OSError, match=f[kind]):
        open_rgb(tmp_path / f[kind])


def _loader_images(dm: SSLDataModule) -> list[torch.Tensor]:
    dm.set_transforms(train=None, eval=lambda img: torch.from_numpy(np.asarray(img).copy()))
    return [dm.split("train", dm.eval_transform)[i][0] for i in range(9)]


def test_bad_images_policy(tmp_path):
    write_images(tmp_path / "imgs")
    strict = SSLDataModule(root=str(tmp_path / "imgs"), val_fraction=0.0, batch_size=2, bad_images="error")
    with pytest.raises(OSError, match="g_truncated.jpg"):
        _loader_images(strict)

    lenient = SSLDataModule(root=str(tmp_path / "imgs"), val_fraction=0.0, batch_size=2, bad_images="skip")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        images = _loader_images(lenient)
    assert lenient.skipped_images == 3 + 2 + 1  # each failed read counts: 6->(7, 8, 0), 7->(8, 0), 8->0
    assert sum("h_empty.jpg" in str(w.message) for w in caught) == 2
    full = np.asarray(open_rgb(tmp_path / "imgs" / "f_full.jpg"))
    # truncated, empty and text files (indices 6, 7, 8) are replaced by the next readable image,
    # wrapping around: deterministic, so every rank and worker makes the same replacement.
    assert all(images[i].shape == (8, 8, 3) for i in (6, 7, 8)) and images[5].shape == full.shape
    assert torch.equal(images[6], images[0]) and torch.equal(images[8], images[0])


def test_skipped_images_are_counted_across_loader_workers(tmp_path):
    """Reads happen in 2 worker processes; the count the main process reports includes them."""
    write_images(tmp_path / "imgs")
    dm = SSLDataModule(root=str(tmp_path / "imgs"), val_fraction=0.0, batch_size=1, num_workers=2, bad_images="skip")
    dm.set_transforms(train=None, eval=lambda img: torch.from_numpy(np.asarray(img).copy()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert len(list(dm.eval_dataloader("train"))) == 9
    assert dm.skipped_images == 3 + 2 + 1  # as with no workers: each failed read counts


def test_bad_images_value_is_checked():
    with pytest.raises(ValueError, match="bad_images='ignore'.*'error' or 'skip'"):
        SSLDataModule(dataset="synthetic", bad_images="ignore")
