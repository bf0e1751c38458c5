"""The weights layer, below everything else: what a checkpoint records about its encoder
(:mod:`~ssl_kit.checkpoints.format`), safe reads and atomic writes (:mod:`~ssl_kit.checkpoints.files`),
per-tensor checksums (:mod:`~ssl_kit.checkpoints.integrity`), verified loading and the newest good
checkpoint (:mod:`~ssl_kit.checkpoints.verified`), frozen sub-modules kept out of checkpoints
(:mod:`~ssl_kit.checkpoints.frozen`), and every encoder source read by ``load_encoder``
(:mod:`~ssl_kit.checkpoints.load`, :mod:`~ssl_kit.checkpoints.official`)."""

from ssl_kit.checkpoints.files import (
    atomic_save_safetensors, atomic_torch_save, atomic_write, read_checkpoint, read_safetensors, read_state_dict,
)
from ssl_kit.checkpoints.format import METADATA_KEY, encoder_from_checkpoint, encoder_record, export_metadata
from ssl_kit.checkpoints.frozen import restore_frozen, strip_frozen
from ssl_kit.checkpoints.load import load_encoder, load_strict
from ssl_kit.checkpoints.timm_names import check_timm_name
from ssl_kit.checkpoints.verified import load_checkpoint, newest_checkpoint, newest_good_checkpoint

__all__ = [
    "atomic_save_safetensors", "atomic_torch_save", "atomic_write", "read_checkpoint", "read_safetensors",
    "read_state_dict", "METADATA_KEY", "encoder_from_checkpoint", "encoder_record", "export_metadata",
    "restore_frozen", "strip_frozen", "load_encoder", "load_strict", "check_timm_name", "load_checkpoint",
    "newest_checkpoint", "newest_good_checkpoint",
]
