"""The base class every pretraining method shares: the training base plus the method contract."""

from __future__ import annotations

import os
from typing import Any, Callable

import torch
from PIL import Image
from torch import Tensor, nn

from ssl_kit.checkpoints.format import METADATA_KEY, encoder_record
from ssl_kit.optim.training import (  # noqa: F401  (re-exported: methods import them from here)
    NO_DECAY_NAMES, OptimizerCallable, TrainingModule, adamw, warmup_cosine, weight_decay_groups,
)
from ssl_kit.views import EvalTransform


class SSLMethod(TrainingModule):
    """The pretraining base: the training machinery of :class:`~ssl_kit.optim.training.TrainingModule`
    (optimizer injection, weight-decay groups, lr scaling, warm-up + cosine) and the method contract.

    The method contract (``tests/test_methods.py`` checks it for every method of the test zoo;
    ``docs/adding_a_method.md`` walks through it):

    * ``encoder`` is a timm model with ``num_classes=0`` and ``encoder_spec`` its (timm name,
      create kwargs); :meth:`extract_features` maps (B, C, H, W) to (B, D), D =
      ``encoder.num_features``, and ``export`` then ``load_encoder`` reproduce it exactly.
    * :meth:`train_transform` maps one image to a **list** of views (``Views`` for one view);
      ``training_step`` receives ``(views, labels)``; :meth:`example_batch` is derived from it.
    * The class declares ``fp16_safe`` (False when the loss regresses pixels).
    * Every random draw of a training step comes from the step generator: per-sample draws
      through :meth:`draw_global`, draws every rank needs whole from :meth:`step_generator`;
      never from the global RNG (a library that draws only from it, like kornia, draws under a
      fork of it seeded from the step generator). N processes with batch b then draw what one
      process with batch N x b draws, and a resumed run draws like an uninterrupted one.
    * Frozen sub-modules rebuilt from their own source stay out of checkpoints
      (``ssl_kit.checkpoints.strip_frozen`` / ``restore_frozen``); ``checkpoint["ssl_kit"]`` is
      extended, never replaced.

    Args:
        optimizer, lr_scaling, warmup_epochs, min_lr_ratio: see
            :class:`~ssl_kit.optim.training.TrainingModule`.
    """

    encoder: nn.Module
    encoder_spec: tuple[str, dict[str, Any]]
    img_size: int
    #: False for methods that regress raw pixels (MAE-style): fp16 overflows there, use bf16.
    fp16_safe: bool = True

    # --- contract -------------------------------------------------------------------------
    def extract_features(self, x: Tensor) -> Tensor:
        """Map images to one feature vector each, as evaluators use it.

        Shapes:
            x: (B, C, H, W) -> (B, D)
        """
        return self.encoder(x)

    def train_transform(self) -> Callable:
        """The per-image training view(s) transform; the data module asks the model for it."""
        raise NotImplementedError

    def eval_transform(self) -> Callable:
        """Deterministic transform for feature extraction (resize, centre crop, normalise)."""
        return EvalTransform(self.img_size)

    def build_encoder(self) -> nn.Module:
        """A freshly initialised encoder of the same architecture (used for random-init baselines)."""
        raise NotImplementedError

    def example_batch(self, batch_size: int, device: torch.device | str = "cpu") -> tuple[Any, Tensor]:
        """A synthetic training batch shaped like the data module's, built on ``device``.

        Derived from :meth:`train_transform`: the transform is applied to one blank image and
        every view it returns becomes a random (B, C, H, W) tensor of that view's shape, so any
        method that declares its views gets a correct batch (``bench`` times training steps on
        it, so the data pipeline is never the bottleneck).

        Shapes:
            returns (views: a list of (B, C, H_v, W_v), one per view, or one (B, C, H, W) tensor
            for single-view transforms; labels (B,))
        """
        views = self.train_transform()(Image.new("RGB", (self.img_size, self.img_size), (128, 128, 128)))

        def batch_of(view: Tensor) -> Tensor:
            return torch.randn(batch_size, *view.shape, device=device)  # (B, C, H_v, W_v)

        batch = [batch_of(v) for v in views] if isinstance(views, (list, tuple)) else batch_of(views)
        return batch, torch.zeros(batch_size, dtype=torch.long, device=device)

    # --- reproducible randomness -----------------------------------------------------------
    def step_generator(self, device: torch.device | str) -> torch.Generator:
        """An RNG seeded by (run seed, optimizer step, micro-batch) for this training batch.

        It is the same on every rank and independent of RNG history, so a method that draws
        its per-sample randomness (e.g. masks) for the *global* batch from it and keeps its own
        rank's rows gets the same draws at any world size and after an exact resume.
        """
        trainer = self.trainer
        micro = trainer.fit_loop.epoch_loop.batch_idx % max(1, trainer.accumulate_grad_batches)
        g = torch.Generator(device=device)
        g.manual_seed(hash((self.run_seed, trainer.global_step, micro)) & (2**63 - 1))
        return g

    def draw_global(self, draw: Callable[..., Any], batch_size: int, device: torch.device | str) -> Any:
        """Per-sample randomness of a training step, drawn for the *global* batch, this rank's rows kept.

        ``draw(n, generator)`` returns a tensor with one row per sample, or tuples, lists and dicts
        of them (nested). In a training step it is called with the global batch size and
        :meth:`step_generator`, and this rank's ``batch_size`` rows are returned: N processes with
        batch b draw exactly what one process with batch N x b draws, and a resumed run draws like
        an uninterrupted one. Outside a training step (inference, reconstructions, tests without a
        trainer) the global RNG is used.

        Shapes:
            draw(n, g) -> (n, ...) or a nest of them; returns (batch_size, ...) likewise.
        """
        if not self.training or self._trainer is None:
            return draw(batch_size, None)
        world, rank = self.trainer.world_size, self.trainer.global_rank
        drawn = draw(world * batch_size, self.step_generator(device))
        return _rows(drawn, slice(rank * batch_size, (rank + 1) * batch_size))

    @property
    def run_seed(self) -> int:
        """The seed the run started with; kept in checkpoints so a resumed run draws as the original."""
        if getattr(self, "_run_seed", None) is None:
            self._run_seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        return self._run_seed

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Lets `export` and `load_encoder` rebuild the encoder without instantiating the method.
        name, kwargs = self.encoder_spec
        checkpoint[METADATA_KEY] = encoder_record(type(self).__name__, name, kwargs, run_seed=self.run_seed)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._run_seed = checkpoint.get(METADATA_KEY, {}).get("run_seed")


def _rows(drawn: Any, rows: slice) -> Any:
    """Rows ``rows`` of every tensor in ``drawn`` (a tensor, or tuples, lists and dicts of them)."""
    if isinstance(drawn, dict):
        return {k: _rows(v, rows) for k, v in drawn.items()}
    if isinstance(drawn, (tuple, list)):
        return type(drawn)(_rows(v, rows) for v in drawn)
    return drawn[rows]
