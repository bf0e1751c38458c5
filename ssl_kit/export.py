"""Export a trained encoder as a timm-loadable ``.safetensors`` file."""

from __future__ import annotations

from pathlib import Path

from ssl_kit.checkpoints import (
    METADATA_KEY, atomic_save_safetensors, encoder_from_checkpoint, export_metadata, load_checkpoint,
)
from ssl_kit.run_dir import writable_dir, writable_file


def export(checkpoint: str, output: str | None = None) -> Path:
    """Write the encoder of an ssl_kit checkpoint as safetensors in timm's key layout.

    The file's metadata holds the timm model name and its arguments, so
    ``timm.create_model(name, pretrained=True, num_classes=0, pretrained_cfg_overlay=dict(file=output), **kwargs)``
    rebuilds it. An ``output`` ending in ``/`` (or an existing directory) gets timm's hub layout
    instead, ``config.json`` + ``model.safetensors``, which
    ``timm.create_model("local-dir:DIR", pretrained=True, num_classes=0)`` loads with no other argument.

    Args:
        checkpoint: an ssl_kit ``.ckpt`` (any method).
        output: destination ``.safetensors`` path or ``DIR/`` (default: the checkpoint's path with
            that suffix).
    """
    from ssl_kit.export_folder import is_folder_output, write_model_folder

    folder = is_folder_output(output)
    if folder:
        out = writable_dir(Path(output), "the export")
    else:
        out = writable_file(Path(output) if output is not None else Path(checkpoint).with_suffix(".safetensors"),
                            "the export")
    ckpt = load_checkpoint(checkpoint)
    name, kwargs, state = encoder_from_checkpoint(ckpt, checkpoint)
    tensors = {k: v.contiguous() for k, v in state.items()}
    metadata = export_metadata(name, kwargs, tensors)
    if folder:
        img_size = kwargs.get("img_size", (ckpt.get("hyper_parameters") or {}).get("img_size"))
        source = {"checkpoint": str(checkpoint), "method": ckpt[METADATA_KEY].get("method")}
        write_model_folder(out, name, kwargs, tensors, metadata, img_size, source)
        print(f"exported {len(state)} tensors of {name} {kwargs} to {out}/ (timm hub layout: config.json + "
              f"model.safetensors, with checksums)")
        return out
    atomic_save_safetensors(tensors, out, metadata)  # never a half-written file
    print(f"exported {len(state)} tensors of {name} {kwargs} to {out} (with checksums)")
    return out
