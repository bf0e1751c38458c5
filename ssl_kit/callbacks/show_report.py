"""End of a run: the pictures of ``python -m ssl_kit show``, written into the run directory."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import torch

from ssl_kit.pictures import ReportInputs, write_report


class ShowReport(pl.Callback):
    """When ``fit`` ends (rank 0), writes ``<run dir>/<dirname>/`` with ``pca.png``,
    ``embedding.png``, ``attention.png`` (ViTs), ``reconstructions.png`` (methods with
    ``reconstruct``: MAE, FCMAE) and ``report.html``, and prints the page's path. Place it after
    :class:`~ssl_kit.callbacks.EvalReport` so the page shows the ``eval.json`` written just before.

    Images come from the data module's validation split (the training split when there is no
    validation split) under the evaluation transform; the
    pooled features are the method's :meth:`~ssl_kit.methods.SSLMethod.extract_features`. The
    process's RNG states are left as they were.

    Args:
        dirname: the report folder inside the run directory.
        num_images: images in the PCA, reconstruction and attention grids.
        max_points: most images in the t-SNE.
        seed: seed of the t-SNE and the reconstructions' masks.

    Examples:
        >>> trainer = pl.Trainer(callbacks=[EvalReport(), ShowReport()])  # doctest: +SKIP
    """

    def __init__(self, dirname: str = "report", num_images: int = 8, max_points: int = 2000, seed: int = 0) -> None:
        self.dirname, self.num_images, self.max_points, self.seed = dirname, num_images, max_points, seed

    def inputs(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> ReportInputs:
        """What the pictures are drawn from: the trained module, the validation split."""
        dm = trainer.datamodule
        run_dir = Path(trainer.default_root_dir)
        dataset = dm.split("val", dm.eval_transform)
        if len(dataset) == 0:  # --data.val_fraction 0 without a val_root: the training images it is
            dataset = dm.split("train", dm.eval_transform)
        return ReportInputs(
            encoder=pl_module.encoder, dataset=dataset, encode=pl_module.extract_features,
            classes=dm.classes() if dm.has_labels() else None,
            reconstructor=pl_module if hasattr(pl_module, "reconstruct") else None,
            eval_json=run_dir / "eval.json", title=f"{type(pl_module).__name__} in {run_dir}",
            notes={"encoder": f"{pl_module.encoder_spec[0]} {pl_module.encoder_spec[1]}",
                   "input": f"{pl_module.img_size} px", "step": str(trainer.global_step)},
        )

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero or trainer.datamodule is None:
            return
        was_training = pl_module.training
        pl_module.eval()
        try:
            with torch.random.fork_rng(devices=[]):  # the report must not shift the run's RNG streams
                page = write_report(Path(trainer.default_root_dir) / self.dirname, self.inputs(trainer, pl_module),
                                    self.num_images, self.max_points, seed=self.seed, device=pl_module.device,
                                    batch_size=trainer.datamodule.eval_batch_size,
                                    num_workers=trainer.datamodule.num_workers)
        finally:
            pl_module.train(was_training)
        print(f"pictures of the encoder written to {page}")
