"""Export a trained encoder as a timm-loadable ``.safetensors`` file."""

from __future__ import annotations

from pathlib import Path

from ssl_kit.checkpoints import atomic_save_safetensors, encoder_from_checkpoint, export_metadata, load_checkpoint
from ssl_kit.run_dir import writable_file


def export(checkpoint: str, output: str | None = None) -> Path:
    """Write the encoder of an ssl_kit checkpoint as safetensors in timm's key layout.

    The file's metadata holds the timm model name and its arguments, so
    ``timm.create_model(name, pretrained=True, num_classes=0, pretrained_cfg_overlay=dict(file=output), **kwargs)``
    rebuilds it.

    Args:
        checkpoint: an ssl_kit ``.ckpt`` (any method).
        output: destination ``.safetensors`` path (default: the checkpoint's path with that suffix).
    """
    out = writable_file(Path(output) if output is not None else Path(checkpoint).with_suffix(".safetensors"),
                        "the export")
    name, kwargs, state = encoder_from_checkpoint(load_checkpoint(checkpoint), checkpoint)
    tensors = {k: v.contiguous() for k, v in state.items()}
    atomic_save_safetensors(tensors, out, export_metadata(name, kwargs, tensors))  # never a half-written file
    print(f"exported {len(state)} tensors of {name} {kwargs} to {out} (with checksums)")
    return out
