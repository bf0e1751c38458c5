"""The tiny zoo: every pretraining method once, small enough for a CPU test.

One place for every test that runs "each method" (``test_methods.py``, the method contract;
``test_resume.py``, exact resume). Adding a method to every such test is one entry in ``ZOO``:
``"name": ("ssl_kit.methods.Name", tiny constructor kwargs, data-module overrides)``.
"""

from __future__ import annotations

import importlib
import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from conftest import TINY_MAE


def teacher_file() -> str:
    """A fixed random ViT-Tiny teacher saved as an ssl_kit export (EVA reloads it by path)."""
    import timm
    from safetensors.torch import save_file

    path = Path(tempfile.gettempdir()) / "ssl_kit_resume_teacher.safetensors"
    if not path.exists():
        kwargs = dict(img_size=32, patch_size=4)
        torch.manual_seed(0)
        teacher = timm.create_model("vit_tiny_patch16_224", num_classes=0, **kwargs)
        tmp = path.with_name(f".{path.name}.tmp")
        save_file(teacher.state_dict(), str(tmp),
                  metadata={"timm_model": "vit_tiny_patch16_224", "timm_kwargs": json.dumps(kwargs), "format": "pt"})
        tmp.replace(path)  # several test processes may write it at once
    return str(path)


#: method id -> (class path, tiny constructor kwargs, data-module kwargs overrides).
ZOO: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "mae": ("ssl_kit.methods.MAE", dict(TINY_MAE), {}),
    "fcmae": ("ssl_kit.methods.FCMAE", dict(model_name="convnextv2_atto", img_size=64, decoder_embed_dim=32,
                                            warmup_epochs=0.0), {}),
    "relicv2": ("ssl_kit.methods.ReLICv2", dict(model_name="resnet18", img_size=32, small_size=16, n_large=2,
                                                n_small=1, hidden_dim=32, out_dim=16, warmup_epochs=0.0), {}),
    "eva": ("ssl_kit.methods.EVA", dict(model_name="vit_tiny_patch16_224", img_size=32, patch_size=4,
                                        min_num_patches=8, warmup_epochs=0.0,
                                        teacher=dict(kind="encoder", checkpoint="<teacher_file>")), {}),
    # freeze_last_layer 1: a resume in epoch 2 crosses the head's last layer's release.
    "dino": ("ssl_kit.methods.DINO", dict(model_name="resnet18", img_size=32, local_size=16, local_crops_number=1,
                                          out_dim=32, hidden_dim=32, bottleneck_dim=16, freeze_last_layer=1,
                                          warmup_epochs=0.0), {}),
}

#: Constructor overrides that make a method's every step random (e.g. sampled negatives, the batched
#: photometric step, here on the CPU), so the contract's randomness checks see each kind of draw a method can make.
ALL_DRAWS: dict[str, dict[str, Any]] = {"relicv2": dict(num_negatives=2, gpu_augment=True)}

#: Methods whose training step draws nothing (all their randomness is augmentation in the data
#: workers): the contract checks that they draw nothing rather than that they use the step generator.
NO_STEP_DRAWS = {"dino"}


def kwargs_of(name: str, **overrides: Any) -> dict[str, Any]:
    """The zoo entry's constructor kwargs (the EVA teacher file made on first use) plus ``overrides``."""
    kwargs = {**ZOO[name][1], **overrides}
    if isinstance(kwargs.get("teacher"), dict) and kwargs["teacher"].get("checkpoint") == "<teacher_file>":
        kwargs["teacher"] = {**kwargs["teacher"], "checkpoint": teacher_file()}
    return kwargs


def method_class(name: str) -> type:
    module_name, class_name = ZOO[name][0].rsplit(".", 1)
    return getattr(importlib.import_module(module_name), class_name)


def build(name: str, **overrides: Any):
    """A freshly initialised zoo method (seeded, so two builds have the same weights)."""
    torch.manual_seed(0)
    return method_class(name)(**kwargs_of(name, **overrides))


def cli_args(name: str) -> list[str]:
    """``fit`` arguments that build the zoo entry through the CLI (``--model CLASS --model.init_args.K V``
    for every constructor kwarg, ``--data.K V`` for its data overrides)."""
    path, _, data = ZOO[name]
    args = ["--model", path]
    for key, value in kwargs_of(name).items():
        args += [f"--model.init_args.{key}", value if isinstance(value, str) else json.dumps(value)]
    for key, value in data.items():
        args += [f"--data.{key}", value if isinstance(value, str) else json.dumps(value)]
    return args
