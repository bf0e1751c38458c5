import pytest
import torch

from ssl_kit.backbones.vit import forward_visible, sincos_pos_embed_2d
from ssl_kit.losses import masked_mse, patchify, pixel_targets, unpatchify
from ssl_kit.masking import random_masking
from ssl_kit.methods import MAE
from ssl_kit.methods.base import weight_decay_groups

from conftest import TINY_MAE


def test_patchify_roundtrip_and_order():
    imgs = torch.randn(2, 3, 8, 12)
    patches = patchify(imgs, 4)  # (B, 6, 48)
    assert patches.shape == (2, 6, 48)
    assert torch.equal(unpatchify(patches, 4, (2, 3)), imgs)
    # patch 1 is the top row, second column: pixels [0:4, 4:8]
    assert torch.equal(patches[0, 1].reshape(4, 4, 3).permute(2, 0, 1), imgs[0, :, 0:4, 4:8])


def test_norm_pix_targets_are_standardised_per_patch():
    t = pixel_targets(torch.rand(2, 3, 8, 8) * 5 + 3, 4, norm_pix=True)
    assert torch.allclose(t.mean(-1), torch.zeros(2, 4), atol=1e-5)
    assert torch.allclose(t.var(-1), torch.ones(2, 4), atol=1e-3)


def test_masked_mse_against_hand_computed_value():
    pred = torch.zeros(1, 3, 2)
    target = torch.tensor([[[1.0, 1.0], [2.0, 0.0], [3.0, 3.0]]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    # removed patches: mean((1,1)^2)=1, mean((2,0)^2)=2 -> (1 + 2) / 2
    assert masked_mse(pred, target, mask).item() == pytest.approx(1.5)


def test_loss_ignores_visible_patches(tiny_mae):
    imgs = torch.randn(2, 3, 32, 32)
    target = pixel_targets(imgs, 4, norm_pix=True)
    _, mask, _ = random_masking(64, 0.75, 2)
    wrong_on_visible = target + 10.0 * (1 - mask).unsqueeze(-1)
    assert masked_mse(wrong_on_visible, target, mask).item() == 0.0
    assert masked_mse(target + 1.0, target, mask).item() == pytest.approx(1.0)


def test_encoder_sees_only_visible_patches(tiny_mae):
    """Changing the pixels of removed patches leaves the encoder output unchanged."""
    tiny_mae.eval()
    imgs = torch.randn(2, 3, 32, 32)
    ids_keep, mask, _ = random_masking(64, 0.75, 2)
    pixel_mask = mask.reshape(2, 1, 8, 8).repeat_interleave(4, 2).repeat_interleave(4, 3)
    tampered = imgs + 100.0 * torch.randn_like(imgs) * pixel_mask
    with torch.no_grad():
        a = forward_visible(tiny_mae.encoder, imgs, ids_keep)
        b = forward_visible(tiny_mae.encoder, tampered, ids_keep)
        c = forward_visible(tiny_mae.encoder, imgs + 0.1 * (1 - pixel_mask), ids_keep)
    assert a.shape == (2, 1 + 16, tiny_mae.encoder.embed_dim)  # cls + K visible, no mask tokens
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)  # and it does see the visible ones


def _decoder_block_input(decoder, latent, ids_restore):
    """What the decoder's Transformer blocks receive, captured with a forward pre-hook."""
    seen = []
    handle = decoder.blocks.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    try:
        decoder(latent, ids_restore)
    finally:
        handle.remove()
    return seen[0]  # (B, n_prefix + L, D_dec)


def test_forward_shapes_and_decoder_unshuffle(tiny_mae):
    """Each encoder token lands at its own patch position: the blocks' input at kept patch
    ``ids_keep[b, k]`` is ``embed(latent[b, 1 + k])`` plus that position's embedding, every
    removed position holds the mask token plus its embedding."""
    loss, pred, mask = tiny_mae(torch.randn(3, 3, 32, 32))
    assert pred.shape == (3, 64, 48) and mask.shape == (3, 64)
    assert loss.ndim == 0 and torch.isfinite(loss)

    dec = tiny_mae.decoder.eval()
    ids_keep, mask, ids_restore = random_masking(64, 0.75, 3, generator=torch.Generator().manual_seed(0))
    latent = torch.randn(3, 1 + 16, tiny_mae.encoder.embed_dim)  # distinct tokens: a swap would show
    x = _decoder_block_input(dec, latent, ids_restore)
    assert x.shape == (3, 1 + 64, 64)
    with torch.no_grad():
        embedded = dec.embed(latent)  # (B, 1 + K, D_dec)
    pos, token = dec.pos_embed[0], dec.mask_token[0, 0]
    for b in range(3):
        torch.testing.assert_close(x[b, 0], embedded[b, 0] + pos[0])  # the cls token stays first
        for k, patch in enumerate(ids_keep[b].tolist()):
            torch.testing.assert_close(x[b, 1 + patch], embedded[b, 1 + k] + pos[1 + patch])
        for patch in mask[b].nonzero().flatten().tolist():
            torch.testing.assert_close(x[b, 1 + patch], token + pos[1 + patch])
    assert not torch.equal(ids_keep[0], ids_keep[0].sort().values)  # kept order is shuffled: the check can fail


def test_sincos_pos_embed_is_fixed_and_distinct(tiny_mae):
    pe = tiny_mae.encoder.pos_embed
    assert not pe.requires_grad
    assert torch.equal(pe[0, 0], torch.zeros_like(pe[0, 0]))  # cls slot
    assert torch.allclose(pe[0, 1:], sincos_pos_embed_2d(pe.shape[-1], 8, 8))
    assert torch.unique(pe[0, 1:], dim=0).shape[0] == 64


def test_extract_features_shape(tiny_mae):
    assert tiny_mae.extract_features(torch.randn(2, 3, 32, 32)).shape == (2, 192)


def test_weight_decay_groups_skip_bias_norm_tokens(tiny_mae):
    decay, no_decay = weight_decay_groups(tiny_mae)
    ids = {id(p) for p in no_decay["params"]}
    assert id(tiny_mae.encoder.cls_token) in ids
    assert id(tiny_mae.decoder.mask_token) in ids
    assert id(tiny_mae.encoder.blocks[0].norm1.weight) in ids
    assert id(tiny_mae.encoder.blocks[0].attn.qkv.bias) in ids
    assert id(tiny_mae.encoder.blocks[0].attn.qkv.weight) in {id(p) for p in decay["params"]}
    assert id(tiny_mae.encoder.pos_embed) not in ids | {id(p) for p in decay["params"]}  # frozen
    assert no_decay["weight_decay"] == 0.0


def _train_on_flat_colours(zero_encoder: bool, steps: int = 40) -> float:
    """Mean loss over the last 5 of ``steps`` AdamW steps on 8 images of one random colour each,
    with a NEW random mask every step; ``zero_encoder`` feeds the decoder zeros instead of the
    encoder output (the same model, init and masks otherwise)."""
    torch.manual_seed(0)
    mae = MAE(**TINY_MAE)
    colours = torch.rand(8, 3, 1, 1, generator=torch.Generator().manual_seed(1)) * 4 - 2
    imgs = colours.expand(8, 3, 32, 32).contiguous()
    target = pixel_targets(imgs, 4, norm_pix=False)  # norm-pix would make every flat patch zero
    opt = torch.optim.AdamW(mae.parameters(), lr=1e-3)
    masks = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(steps):
        ids_keep, mask, ids_restore = random_masking(64, 0.75, 8, generator=masks)
        latent = forward_visible(mae.encoder, imgs, ids_keep)
        if zero_encoder:
            latent = torch.zeros_like(latent)
        loss = masked_mse(mae.decoder(latent, ids_restore), target, mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return sum(losses[-5:]) / 5


def test_learns_from_the_visible_patches():
    """Reconstruction must use what the encoder saw. Each image is one colour, so its removed
    patches are predictable only from its visible ones; the masks change every step, so a decoder
    fed zeros cannot recognise an image by its mask pattern and can only learn the mean colour
    (measured: 0.04 with the encoder vs 0.68 zeroed after 40 steps)."""
    with_encoder, zeroed = _train_on_flat_colours(False), _train_on_flat_colours(True)
    assert with_encoder < 0.25 * zeroed, (with_encoder, zeroed)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(img_size=30), "not divisible by patch_size=4"),
        (dict(mask_ratio=1.0), "mask_ratio=1.0"),
        (dict(mask_ratio=0.0), "mask_ratio=0.0"),
        (dict(model_name="vit_tinyy_patch16_224"), "Unknown timm model name 'vit_tinyy_patch16_224'"),
        (dict(model_name="resnet18"), "not a timm VisionTransformer"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MAE(**{**TINY_MAE, **kwargs})


@pytest.mark.parametrize("name, patch, size", [("vit_small_patch16_224", 8, 48), ("vit_small_patch32_224", None, 64)])
def test_any_timm_vit(name, patch, size):
    mae = MAE(name, img_size=size, patch_size=patch, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
    loss, pred, mask = mae(torch.randn(2, 3, size, size))
    L = (size // mae.patch_size) ** 2
    assert pred.shape == (2, L, mae.patch_size**2 * 3) and torch.isfinite(loss)


def test_reconstruct_undoes_norm_pix_with_each_patch_statistics(tiny_mae):
    """A perfect norm-pix prediction maps back to the original pixels."""
    from ssl_kit.losses import predictions_to_image

    imgs = torch.rand(2, 3, 32, 32) * 3 + 1
    assert torch.allclose(predictions_to_image(pixel_targets(imgs, 4, True), imgs, 4, True), imgs, atol=1e-4)
    assert torch.equal(predictions_to_image(patchify(imgs, 4), imgs, 4, False), imgs)
    recon, mask = tiny_mae.reconstruct(imgs)
    assert recon.shape == imgs.shape and mask.shape == (2, 64)
