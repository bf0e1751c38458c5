"""MAE / FCMAE reconstructions: masked input, reconstruction with the visible patches pasted back, original."""

from __future__ import annotations

import inspect
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor, nn

from ssl_kit.pictures.canvas import denormalise, labelled_grid, to_pil


def reconstructor_from_checkpoint(path: str | Path) -> nn.Module | None:
    """The MAE or FCMAE of an ssl_kit checkpoint, rebuilt from its hyper-parameters with its
    weights (decoder included), in eval mode; None for any other source.

    The method is chosen by name among ssl_kit's own classes that reconstruct images; nothing
    else named in the file is instantiated. The checkpoint is loaded with ``weights_only=True``
    and verified like every other load.
    """
    from ssl_kit.checkpoints import METADATA_KEY, load_checkpoint
    from ssl_kit.methods import FCMAE, MAE

    path = Path(path)
    if not path.is_file() or path.suffix == ".safetensors":
        return None
    ckpt = load_checkpoint(path)
    methods = {"MAE": MAE, "FCMAE": FCMAE}
    cls = methods.get((ckpt.get(METADATA_KEY) or {}).get("method"))
    if cls is None or not isinstance(ckpt.get("hyper_parameters"), dict):
        return None
    accepted = inspect.signature(cls.__init__).parameters
    hparams = {k: v for k, v in ckpt["hyper_parameters"].items() if k in accepted and k != "optimizer"}
    module = cls(**hparams)
    module.load_state_dict(ckpt["state_dict"])
    return module.eval()


@torch.no_grad()
def reconstruct(module: nn.Module, imgs: Tensor, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``module.reconstruct(imgs)`` in eval mode with masks drawn under ``seed``; the caller's RNG
    states (CPU and the images' GPU) are left as they were.

    Shapes:
        imgs: (B, C, H, W) -> recon (B, C, H, W), mask (B, L) with 1 = removed
    """
    cuda = imgs.device.type == "cuda"
    was_training = module.training
    with torch.random.fork_rng(devices=[imgs.device] if cuda else []):
        torch.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(imgs.device):
                torch.cuda.manual_seed(seed)
        module.eval()
        try:
            return module.reconstruct(imgs)
        finally:
            module.train(was_training)


def reconstruction_rows(imgs: Tensor, recon: Tensor, mask: Tensor, patch_size: int) -> Tensor:
    """(masked input, reconstruction with the visible patches pasted back, original), in [0, 1].

    Shapes:
        imgs, recon: (B, C, H, W); mask: (B, L), 1 = removed -> (3, B, C, H, W)
    """
    h, w = imgs.shape[-2] // patch_size, imgs.shape[-1] // patch_size
    pixel_mask = mask.reshape(-1, 1, h, w).repeat_interleave(patch_size, 2).repeat_interleave(patch_size, 3)  # (B, 1, H, W)
    visible = imgs * (1 - pixel_mask)
    pasted = visible + recon * pixel_mask
    masked = denormalise(visible) * (1 - pixel_mask) + 0.5 * pixel_mask  # removed patches drawn grey
    return torch.stack([masked, denormalise(pasted), denormalise(imgs)])  # (3, B, C, H, W)


def reconstruction_picture(module: nn.Module, imgs: Tensor, seed: int = 0, tile: int = 64) -> tuple[Image.Image, str]:
    """Rows: masked input, reconstruction (visible patches pasted back), original.

    Shapes:
        imgs: (B, 3, H, W), normalised as ssl_kit's evaluation transform does.
    """
    recon, mask = reconstruct(module, imgs, seed)
    rows = reconstruction_rows(imgs, recon.float(), mask.float(), module.patch_size)  # (3, B, C, H, W)
    tiles = [[to_pil(im, tile) for im in row] for row in rows]
    ratio = float(mask.float().mean())
    note = f"{type(module).__name__}, {ratio:.0%} of {module.patch_size}x{module.patch_size} patches removed"
    return labelled_grid(tiles, ["masked", "reconstruction", "original"], title=f"Reconstructions ({note})"), note
