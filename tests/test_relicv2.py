"""ReLICv2: loss vs the formula, stop-gradients, EMA target, multi-crop views and routing, saliency
masking, DDP equivalence, configs and a CLI fit."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import REPO, assert_ok, run_cli
from ssl_kit.losses import relic_loss, relicv2_loss, sample_candidates
from ssl_kit.methods import ReLICv2
from ssl_kit.methods.ema import EMATarget, cosine_momentum
from ssl_kit.views import IMAGENET_MEAN, IMAGENET_STD
from ssl_kit.views.multicrop import BYOL_VIEWS, MultiCropTransform, SaliencyMasks

TINY = dict(model_name="resnet18", img_size=32, small_size=16, n_large=2, n_small=1, hidden_dim=64, out_dim=32,
            warmup_epochs=0.0)

#: BN-free (ViT + LayerNorm, head without BatchNorm): SyncBatchNorm needs a GPU, DDP tests run on CPU.
DDP_MODEL = dict(model_name="vit_tiny_patch16_224", img_size=32, small_size=16, n_large=2, n_small=1,
                 hidden_dim=64, out_dim=32, head_batch_norm=False,
                 encoder_kwargs=dict(img_size=32, patch_size=8, dynamic_img_size=True, depth=2))


def slow_relic(online, target, tau, alpha, beta, candidates=None):
    """The methods.md formula term by term, with Python floats (no stop-gradient: values only)."""
    z = [[v / math.sqrt(sum(a * a for a in row)) for v in row] for row in online.tolist()]
    t = [[v / math.sqrt(sum(a * a for a in row)) for v in row] for row in target.tolist()]
    n = len(z)
    phi = [[sum(a * b for a, b in zip(z[i], t[j])) / tau for j in range(n)] for i in range(n)]
    cand = [[candidates is None or bool(candidates[i][j]) for j in range(n)] for i in range(n)]

    def p(i, j):  # anchor online i, candidate target j
        return math.exp(phi[i][j]) / sum(math.exp(phi[i][k]) for k in range(n) if cand[i][k])

    def p_rev(i, j):  # anchor target j, candidate online i
        return math.exp(phi[i][j]) / sum(math.exp(phi[k][j]) for k in range(n) if cand[k][j])

    total = 0.0
    for i in range(n):
        js = [j for j in range(n) if cand[i][j]]
        kl = sum(p(i, j) * math.log(p(i, j)) for j in js) - sum(p(i, j) * math.log(p_rev(i, j)) for j in js)
        total += -alpha * math.log(p(i, i)) + beta * kl
    return total / n


# --- loss ---------------------------------------------------------------------------------------
def test_loss_known_value_orthogonal_embeddings():
    # phi = identity / tau: p(positive) = e / (e + 1) both ways, so KL = 0 and loss = log(1 + 1/e).
    e = torch.eye(2)
    loss, contrastive, invariance = relic_loss(e, e, temperature=1.0, alpha=1.0, beta=1.0)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-6)
    assert invariance.item() == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("sampled", [False, True])
def test_loss_matches_slow_formula(sampled):
    g = torch.Generator().manual_seed(0)
    online, target = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    candidates = sample_candidates(5, 2, torch.Generator().manual_seed(1)) if sampled else None
    loss, _, invariance = relic_loss(online, target, temperature=0.5, alpha=0.7, beta=1.3, candidates=candidates)
    expected = slow_relic(online, target, 0.5, 0.7, 1.3, candidates.tolist() if sampled else None)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert invariance.item() > 1e-3  # the asymmetric example exercises the KL term


def test_alpha_beta_isolate_terms():
    g = torch.Generator().manual_seed(2)
    online, target = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    _, contrastive, invariance = relic_loss(online, target, 0.2)
    assert relic_loss(online, target, 0.2, alpha=1.0, beta=0.0)[0].item() == pytest.approx(contrastive.item())
    assert relic_loss(online, target, 0.2, alpha=0.0, beta=2.0)[0].item() == pytest.approx(2 * invariance.item())
    assert relic_loss(online, target, 0.2, alpha=0.0, beta=1.0)[0].item() == pytest.approx(
        slow_relic(online, target, 0.2, 0.0, 1.0), rel=1e-5)


def test_stop_gradient_sides():
    g = torch.Generator().manual_seed(3)
    online = torch.randn(4, 3, generator=g, requires_grad=True)
    target = torch.randn(4, 3, generator=g, requires_grad=True)
    relic_loss(online, target, 0.3, alpha=0.0, beta=1.0)[0].backward()
    assert target.grad is None  # the target network's side never gets a gradient
    # The KL's gradient is that of -sum p log p_rev only: sg[sum p log p] contributes nothing.
    on = online.detach().clone().requires_grad_(True)
    z, t = torch.nn.functional.normalize(on, dim=-1), torch.nn.functional.normalize(target.detach(), dim=-1)
    logits = z @ t.T / 0.3
    p, log_p_rev = logits.softmax(1), logits.log_softmax(0)
    grad_sg = torch.autograd.grad(-(p * log_p_rev).sum(1).mean(), on, retain_graph=True)[0]
    assert torch.allclose(online.grad, grad_sg, atol=1e-6)
    full_kl = (p * (logits.log_softmax(1) - log_p_rev)).sum(1).mean()
    grad_full = torch.autograd.grad(full_kl, on)[0]
    assert not torch.allclose(grad_full, grad_sg, atol=1e-4)  # so the check above can fail


def test_multicrop_average_and_process_slices():
    g = torch.Generator().manual_seed(4)
    online = [torch.randn(6, 4, generator=g) for _ in range(3)]  # 2 large + 1 small
    target = [torch.randn(6, 4, generator=g) for _ in range(2)]
    loss = relicv2_loss(online, target, 0.2)[0]
    pairs = [slow_relic(o, t, 0.2, 1.0, 1.0) for o in online for t in target]
    assert loss.item() == pytest.approx(sum(pairs) / (3 * 2), rel=1e-5)
    halves = [relicv2_loss(online, target, 0.2, rows=r)[0] for r in ((0, 3), (3, 6))]
    assert ((halves[0] + halves[1]) / 2).item() == pytest.approx(loss.item(), rel=1e-6)


def test_sample_candidates():
    mask = sample_candidates(8, 3, torch.Generator().manual_seed(0))
    assert mask.diagonal().all() and (mask.sum(1) == 4).all()
    with pytest.raises(ValueError, match="num_negatives=8"):
        sample_candidates(8, 8, torch.Generator())


# --- EMA target -----------------------------------------------------------------------------------
def test_ema_update_and_schedule_end_points():
    assert cosine_momentum(0, 100) == pytest.approx(0.996)
    assert cosine_momentum(100, 100) == pytest.approx(1.0)
    assert cosine_momentum(50, 100) == pytest.approx(0.998)
    online = torch.nn.Linear(3, 2)
    target = EMATarget(online)
    t0 = target.module.weight.detach().clone()
    with torch.no_grad():
        online.weight.add_(1.0)
    m = target.update(online, step=25, total_steps=100)
    assert torch.allclose(target.module.weight, m * t0 + (1 - m) * online.weight, atol=1e-6)
    assert target.state_dict()["momentum"].item() == pytest.approx(m)
    assert not any(p.requires_grad for p in target.parameters())


def _datamodule(batch_size=4):
    from ssl_kit.data import SSLDataModule

    return SSLDataModule(dataset="synthetic", batch_size=batch_size, num_workers=0, synthetic_size=16, image_size=40)


def _fit(model, steps=2, batch_size=4):
    import pytorch_lightning as pl

    dm = _datamodule(batch_size)
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, dm)
    return trainer


def test_target_never_moves_through_the_optimizer():
    torch.manual_seed(0)
    # momentum 1: only the optimizer could move the target.
    model = ReLICv2(**{**DDP_MODEL, "head_batch_norm": True}, base_momentum=1.0, final_momentum=1.0)
    target0 = {k: v.clone() for k, v in model.target.module.named_parameters()}
    online0 = model.encoder.patch_embed.proj.weight.detach().clone()
    trainer = _fit(model, steps=1)
    opt_params = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert not opt_params & {id(p) for p in model.target.parameters()}
    assert all(torch.equal(p, target0[k]) for k, p in model.target.module.named_parameters())
    assert not torch.equal(model.encoder.patch_embed.proj.weight, online0)  # the online network did train


def test_export_writes_the_online_encoder_not_the_ema_target(tmp_path):
    """README: ReLICv2 exports (and evaluators load) the online encoder; the EMA target stays in
    the checkpoint for resuming only."""
    from safetensors.torch import load_file

    from ssl_kit.export import export

    torch.manual_seed(0)
    model = ReLICv2(**TINY)
    trainer = _fit(model, steps=1)
    with torch.no_grad():  # make the target unmistakable (after one step it is ~0.4% from online)
        for p in model.target.parameters():
            p.add_(1.0)
    trainer.save_checkpoint(tmp_path / "relic.ckpt")
    exported = load_file(str(export(str(tmp_path / "relic.ckpt"), str(tmp_path / "enc.safetensors"))))
    online, target = model.encoder.state_dict(), model.target.module[0].state_dict()
    assert set(exported) == set(online)
    assert all(torch.equal(exported[k], v) for k, v in online.items())
    assert not torch.equal(exported["conv1.weight"], target["conv1.weight"])


# --- views and routing --------------------------------------------------------------------------------
def test_views_shapes_and_small_crops_never_reach_target():
    torch.manual_seed(0)
    model = ReLICv2(**TINY)
    views = model.train_transform()(Image.new("RGB", (48, 40), (90, 120, 200)))
    assert [tuple(v.shape) for v in views] == [(3, 32, 32), (3, 32, 32), (3, 16, 16)]
    seen = {"target": [], "online": []}
    model.target.register_forward_pre_hook(lambda m, a: seen["target"].append(tuple(a[0].shape)))
    model.encoder.register_forward_pre_hook(lambda m, a: seen["online"].append(tuple(a[0].shape)))
    batch = [torch.stack([v] * 3) for v in views]
    model(batch)
    assert seen["target"] == [(6, 3, 32, 32)]  # both large crops, concatenated; never a small one
    assert seen["online"] == [(6, 3, 32, 32), (3, 3, 16, 16)]


def test_gpu_path_workers_crop_and_module_augments():
    # gpu_augment=True on CPU tensors: workers return un-normalised crops, the module's kornia
    # pipelines (on_after_batch_transfer on a GPU) add the photometric part and normalise.
    torch.manual_seed(0)
    model = ReLICv2(**TINY, gpu_augment=True)
    views = model.train_transform()(Image.new("RGB", (48, 40), (255, 255, 255)))
    assert all(v.min() >= 0.99 for v in views)  # white crops: no jitter, no normalisation yet
    out = model.augment_views([torch.stack([v] * 16) for v in views])
    assert [tuple(v.shape) for v in out] == [(16, 3, 32, 32), (16, 3, 32, 32), (16, 3, 16, 16)]
    assert all(v.max() > 1.5 for v in out)  # normalised: white maps to (1 - mean) / std > 2


def test_gpu_path_draws_parameters_per_sample():
    """16 copies of one crop come out as 16 different views (jitter, grayscale and blur are drawn
    per sample), and the photometric ops did run: not just normalisation."""
    torch.manual_seed(0)
    model = ReLICv2(**TINY, gpu_augment=True)
    model.train_transform()  # builds the data-worker transform and the module's kornia pipelines
    crop = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    for view in model.augment_views([crop.expand(16, 3, 32, 32).contiguous()] * 2):
        flat = view.flatten(1)  # (16, 3 * 32 * 32)
        assert torch.cdist(flat, flat).add(torch.eye(16)).min() > 1e-3  # pairwise different
        changed = (view - (crop - mean) / std).flatten(1).abs().amax(1) > 1e-3
        assert changed.float().mean() >= 0.75  # jitter alone runs with p = 0.8


def test_gpu_path_in_a_training_step_draws_for_the_global_batch_from_the_step_generator():
    """In a training step the kornia parameters are drawn for the global batch from the step
    generator: the views are augmented (not only normalised), the same under another global RNG
    state (which is left as it was), different at another step, and 2 processes' halves are the
    1-process views."""
    from test_methods import fake_trainer

    torch.manual_seed(0)
    model = ReLICv2(**TINY, gpu_augment=True).train()
    model.train_transform()  # builds the module's kornia pipelines
    rng = torch.Generator().manual_seed(0)
    views = [torch.rand(8, 3, s, s, generator=rng) for s in (32, 32, 16)]
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def augmented(world=1, rank=0, step=3, global_seed=0):
        model._trainer = fake_trainer(world, rank, step)
        torch.manual_seed(global_seed)
        before = torch.get_rng_state()
        rows = slice(rank * 8 // world, (rank + 1) * 8 // world)
        out = model.augment_views([v[rows] for v in views])
        assert torch.equal(torch.get_rng_state(), before)
        return out

    first = augmented()
    for view, raw in zip(first, views):
        changed = (view - (raw - mean) / std).flatten(1).abs().amax(1) > 1e-3  # (8,)
        assert changed.float().mean() >= 0.5
    assert all(torch.equal(a, b) for a, b in zip(first, augmented(global_seed=1)))
    assert all(not torch.equal(a, b) for a, b in zip(first, augmented(step=4)))
    halves = [augmented(world=2, rank=r, global_seed=100 + r) for r in range(2)]
    for v, view in enumerate(first):  # the same parameters, applied per sample: equal up to float noise
        assert torch.allclose(torch.cat([h[v] for h in halves]), view, atol=1e-6, rtol=0), v


def test_gpu_path_in_a_lightning_fit_uses_the_step_generator():
    """In a real fit (on the CPU) the batch reaching training_step went through the batched
    photometric step, with parameters that do not depend on the global RNG."""
    import pytorch_lightning as pl

    torch.manual_seed(0)
    model = ReLICv2(**TINY, gpu_augment=True)
    augment, checked = model.augment_views, []

    class Recheck(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            torch.manual_seed(1000 + batch_idx)  # another global RNG state: the same views
            again = augment(model.raw_views)
            checked.append(all(torch.equal(a, b) for a, b in zip(batch[0], again)))

    def recording(views):
        model.raw_views = [v.clone() for v in views]
        return augment(views)

    model.augment_views = recording
    dm = _datamodule()
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[Recheck()])
    trainer.fit(model, dm)
    assert checked == [True, True]


def _raw_views(ph, img: torch.Tensor, n: int, path: str) -> torch.Tensor:
    """n augmentations of ``img`` by ``ph`` on the CPU (torchvision) or GPU (kornia) path, un-normalised."""
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    torch.manual_seed(1)
    if path == "torchvision":
        pipeline = ph.torchvision(img.shape[-1])
        out = torch.stack([pipeline(img) for _ in range(n)])
    else:
        out = ph.kornia(img.shape[-1])(img.expand(n, *img.shape).contiguous())
    return out * std + mean  # (n, 3, H, W)


ONLY = dict(jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=0.0)


@pytest.fixture
def one_thread():
    # Hundreds of tiny per-image ops: 2 OpenMP threads on a shared 2-core CPU spin far longer than they work.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("path", ["torchvision", "kornia"])
def test_each_photometric_op_runs_at_its_probability(path, one_thread):
    """Each op of BYOL's two view settings, alone, changes the image at its configured rate
    (binomial: within 4.5 sigma at n = 400). Blur is tested with sigma >= 1, where it is visible
    on noise (below ~0.2 a 3-tap Gaussian is the identity in float32)."""
    img, n = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0)), 400
    for view in BYOL_VIEWS:
        for op in ("jitter", "grayscale", "blur", "solarize"):
            p = getattr(view, f"{op}_p")
            ph = replace(view, **{**ONLY, f"{op}_p": p}, blur_sigma=(1.0, 2.0))
            raw = _raw_views(ph, img, n, path)
            if op == "grayscale":
                hit = (raw - raw.mean(1, keepdim=True)).abs().amax((1, 2, 3)) < 1e-4  # equal channels
            else:
                hit = (raw - img).abs().amax((1, 2, 3)) > 1e-3
            rate = hit.float().mean().item()
            assert abs(rate - p) <= 4.5 * math.sqrt(p * (1 - p) / n), (path, view, op, rate)


def _ks(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample Kolmogorov-Smirnov statistic."""
    grid = torch.cat([a, b]).sort().values
    cdf = lambda x: torch.searchsorted(x.sort().values, grid, right=True) / len(x)  # noqa: E731
    return (cdf(a) - cdf(b)).abs().max().item()


def test_kornia_and_torchvision_paths_draw_the_same_strengths(one_thread):
    """Each colour-jitter component alone (brightness -> mean, contrast -> spread, saturation ->
    chroma, hue -> hue shift) and blur (mean change; sigma in the configured range) have the same
    per-sample strength distribution on both paths: two-sample KS below its 0.1% critical value
    (0.159 at n = 300 each)."""
    from kornia.color import rgb_to_hsv

    # A noisy orange image: every pixel has a well-defined hue.
    noise = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))
    img = noise * 0.5 + torch.tensor([0.5, 0.2, 0.0]).view(3, 1, 1)
    n = 300

    def hue_shift(r: torch.Tensor) -> torch.Tensor:  # circular mean of the per-pixel hue change
        delta = rgb_to_hsv(r.clamp(0, 1))[:, 0] - rgb_to_hsv(img)[0]  # (n, H, W), radians
        return torch.atan2(delta.sin().mean((1, 2)), delta.cos().mean((1, 2)))

    view = BYOL_VIEWS[0]
    alone = dict(brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0)
    stats = {  # component: (its strength from BYOL_VIEWS[0], the statistic it moves)
        "brightness": (view.brightness, lambda r: r.mean((1, 2, 3))),
        "contrast": (view.contrast, lambda r: r.std((1, 2, 3))),
        "saturation": (view.saturation, lambda r: (r.amax(1) - r.amin(1)).mean((1, 2))),
        "hue": (view.hue, hue_shift),
    }
    cases = {name: (replace(view, **{**ONLY, "jitter_p": 1.0, **alone, name: strength}), stat)
             for name, (strength, stat) in stats.items()}
    cases["blur"] = (replace(view, **{**ONLY, "blur_p": 1.0}), lambda r: (r - img).abs().mean((1, 2, 3)))
    for name, (ph, stat) in cases.items():
        cpu, gpu = (stat(_raw_views(ph, img, n, path)) for path in ("torchvision", "kornia"))
        assert cpu.std() > 1e-3, name  # the component does vary the images
        assert _ks(cpu, gpu) < 1.95 * math.sqrt(2 / n), name


# --- saliency masks ---------------------------------------------------------------------------------
def _saliency_folder(tmp_path: Path) -> tuple[Path, Path]:
    images, masks = tmp_path / "images" / "a", tmp_path / "masks" / "a"
    images.mkdir(parents=True)
    masks.mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (40, 40), (255, 255, 255)).save(images / f"{i}.jpg")
    Image.new("L", (20, 20), 0).save(masks / "0.png")  # all background; 1.jpg and 2.jpg have none
    return tmp_path / "images", tmp_path / "masks"


@pytest.mark.parametrize("p_m", [0.0, 0.3, 1.0])
def test_saliency_masking_probability(tmp_path, p_m):
    from ssl_kit.data import ImageFolder

    images, masks = _saliency_folder(tmp_path)
    saliency = SaliencyMasks(masks)
    data = ImageFolder(str(images))
    assert saliency.check(data.files[i].relative_to(images).as_posix() for i in range(3)) == 1
    t = MultiCropTransform(2, 1, 16, 8, saliency=saliency, p_m=p_m, photometric=False)
    views = [t(data.load(0)) for _ in range(200)]
    removed = torch.tensor([[v.max().item() < 0.01 for v in vs] for vs in views]).float()  # (200, 3)
    assert removed[:, :2].mean().item() == pytest.approx(p_m, abs=0.08)  # 4 sigma at p=0.3
    assert removed[:, 2].sum() == 0  # small crops are never background-removed
    assert all(v.min() > 0.99 for vs in (t(data.load(1)) for _ in range(5)) for v in vs)  # no mask: untouched


def test_saliency_keeps_the_foreground_and_blacks_out_the_background(tmp_path):
    """A mask whose top half is white: removing the background keeps the top half of the image
    exactly and makes the bottom half black, directly and in a background-removed large crop."""
    import numpy as np

    from ssl_kit.data import ImageFolder

    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    pixels = np.random.default_rng(0).integers(30, 256, size=(40, 40, 3), dtype=np.uint8)  # no black pixel
    Image.fromarray(pixels).save(tmp_path / "images" / "0.png")
    mask = np.zeros((20, 20), dtype=np.uint8)  # another size than the image: resized to it
    mask[:10] = 255
    Image.fromarray(mask).save(tmp_path / "masks" / "0.png")
    saliency, img = SaliencyMasks(tmp_path / "masks"), ImageFolder(str(tmp_path / "images")).load(0)
    out = np.asarray(saliency.remove_background(img))
    assert np.array_equal(out[:20], pixels[:20]) and not out[20:].any()

    # Through the transform: large crops (whole image at scale 1, flipped left-right at most)
    # come from the background-removed image; the small crop never does.
    t = MultiCropTransform(2, 1, 16, 8, large_scale=(1.0, 1.0), small_scale=(1.0, 1.0), saliency=saliency,
                           p_m=1.0, photometric=False)
    for _ in range(5):
        views = t(img)
        for v in views[:2]:
            assert v[:, :6].amin(0).min() > 0.05 and v[:, 10:].max() == 0.0  # foreground kept, background black
        assert views[2][:, 5:].min() > 0.05  # the small crop keeps the background


def test_saliency_folder_matching_no_image(tmp_path):
    _, masks = _saliency_folder(tmp_path)
    with pytest.raises(ValueError, match="0 of 2 matched"):
        SaliencyMasks(masks).check(["b/0.jpg", "b/1.jpg"])


@pytest.mark.parametrize("bad, match", [
    (dict(n_large=0), "n_large=0"),
    (dict(small_size=48), "small crop size 48 is larger"),
    (dict(p_m=1.5, saliency_root="x"), "p_m=1.5"),
    (dict(p_m=-0.1, saliency_root="x"), "p_m=-0.1"),
    (dict(p_m=0.5), "needs saliency_root"),
    (dict(model_name="resnet_50"), "Unknown timm model name 'resnet_50'"),
    (dict(model_name="vit_tiny_patch16_224", encoder_kwargs=dict(img_size=32, patch_size=8, depth=1)),
     "dynamic_img_size"),
])
def test_bad_input(bad, match):
    with pytest.raises(ValueError, match=match):
        ReLICv2(**{**TINY, **bad})


# --- DDP equivalence ----------------------------------------------------------------------------
def _ddp_views(n=8):
    g = torch.Generator().manual_seed(5)
    return [torch.randn(n, 3, 32, 32, generator=g), torch.randn(n, 3, 32, 32, generator=g),
            torch.randn(n, 3, 16, 16, generator=g)]


def _loss_and_grads(model, views, num_negatives):
    model.hparams.num_negatives = num_negatives
    model.zero_grad()
    loss = model(views)[0]
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.encoder.parameters() if p.grad is not None]


def _ddp_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = ReLICv2(**DDP_MODEL)
    views = [v.chunk(world)[rank] for v in _ddp_views()]
    results = []
    for n_e in (None, 3):
        loss, grads = _loss_and_grads(model, views, n_e)
        dist.all_reduce(loss)
        for g in grads:  # what DDP does to gradients
            dist.all_reduce(g)
            g /= world
        results.append((loss / world, grads))
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_process_gloo_matches_one_process(tmp_path):
    torch.manual_seed(0)
    model = ReLICv2(**DDP_MODEL)
    reference = [_loss_and_grads(model, _ddp_views(), n_e) for n_e in (None, 3)]
    torch.multiprocessing.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    for rank in range(2):
        for (loss, grads), (ref_loss, ref_grads) in zip(torch.load(tmp_path / f"rank{rank}.pt"), reference):
            assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)
            assert all(torch.allclose(g, r, rtol=1e-4, atol=1e-6) for g, r in zip(grads, ref_grads))


# --- configs and CLI ------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("config", ["configs/relicv2.yaml", "configs/demo/relicv2.yaml"])
def test_config_resolves(config):
    proc = run_cli("fit", "--config", config, "--print_config")
    assert_ok(proc)
    assert "ssl_kit.methods.ReLICv2" in proc.stdout and "ssl_kit.optim.LARS" in proc.stdout


@pytest.mark.slow
def test_cli_fit_two_steps(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli("fit", "--config", str(REPO / "configs/demo/relicv2.yaml"), "--data.dataset", "synthetic",
                   "--data.synthetic_size", "40", "--data.batch_size", "16", "--data.num_workers", "0",
                   "--trainer.max_epochs", "1", "--checkpoint.every_n_epochs", "1", "--trainer.default_root_dir", str(run_dir),
                   "--model.init_args.hidden_dim", "64", "--model.init_args.num_negatives", "4")
    assert_ok(proc)
    # The run's checkpoint (last.ckpt on main; this test is about ReLICv2's state, not the file name).
    ckpt = torch.load(sorted(run_dir.glob("*.ckpt"))[-1], map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 2 and ckpt["ssl_kit"]["encoder_name"] == "resnet18"
    # The momentum is saved and follows the schedule in optimizer steps: 0.99 -> 1 reached at step 2 of 2.
    assert ckpt["state_dict"]["target.momentum"].item() == pytest.approx(1.0)
    assert "pretrained" in (run_dir / "eval.json").read_text()
