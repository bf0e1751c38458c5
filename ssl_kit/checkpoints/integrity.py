"""Checksums of every tensor in a checkpoint or export, and the finite-weights check.

A checkpoint records one CRC-32 per tensor (over its dtype, shape and bytes) under
``ssl_kit_checksums`` when it is written; loading recomputes them and names the first tensor that
differs, so a flipped bit or an overwritten block is refused instead of silently becoming NaN
weights. Exports carry the same record in their safetensors metadata. CRC-32 (zlib) detects
accidental corruption, not tampering; it reads each tensor's bytes once (about 2 GB/s per core,
see README).
"""

from __future__ import annotations

import json
import zlib
from typing import Any, Iterator

import torch
from torch import Tensor

from ssl_kit.errors import CorruptCheckpointError

#: Checkpoint key (and safetensors metadata key) of the per-tensor checksums.
CHECKSUM_KEY = "ssl_kit_checksums"
ALGORITHM = "crc32"


def named_tensors(obj: Any, prefix: str = "") -> Iterator[tuple[str, Tensor]]:
    """Every tensor inside nested dicts / lists / tuples, with a ``/``-joined path (``state_dict/encoder.cls_token``)."""
    if isinstance(obj, Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from named_tensors(value, f"{prefix}/{key}" if prefix else str(key))
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from named_tensors(value, f"{prefix}/{i}" if prefix else str(i))


def tensor_crc(t: Tensor) -> int:
    """CRC-32 of a tensor's dtype, shape and bytes (device and memory layout do not matter)."""
    t = t.detach()
    crc = zlib.crc32(f"{t.dtype}{tuple(t.shape)}".encode())
    if t.numel() == 0:
        return crc
    data = t.cpu().contiguous().reshape(-1).view(torch.uint8)  # (numel * itemsize,)
    return zlib.crc32(memoryview(data.numpy()), crc)


def checksums(obj: Any) -> dict[str, int]:
    """``{path: crc}`` of every tensor in ``obj`` (see :func:`named_tensors`)."""
    return {name: tensor_crc(t) for name, t in named_tensors(obj)}


def seal(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """A shallow copy of ``checkpoint`` with the checksums of its tensors recorded."""
    body = {k: v for k, v in checkpoint.items() if k != CHECKSUM_KEY}
    return {**body, CHECKSUM_KEY: {"algorithm": ALGORITHM, "tensors": checksums(body)}}


def verify(checkpoint: dict[str, Any], source: str) -> dict[str, Any]:
    """Check ``checkpoint`` against its recorded checksums and drop the record.

    A checkpoint written before checksums existed (no record) passes unchanged.

    Raises:
        CorruptCheckpointError: a tensor is missing, added or differs (the first one is named).
    """
    record = checkpoint.pop(CHECKSUM_KEY, None)
    if record is None:
        return checkpoint
    compare(record["tensors"], checksums(checkpoint), source)
    return checkpoint


def compare(expected: dict[str, int], found: dict[str, int], source: str) -> None:
    """Raise naming the first tensor whose checksum in ``found`` differs from ``expected``."""
    bad = [name for name in expected if found.get(name) != expected[name]]
    bad += [name for name in found if name not in expected]
    if bad:
        what = "is missing" if bad[0] not in found else "was added" if bad[0] not in expected else "differs"
        raise CorruptCheckpointError(f"{source} is corrupt: tensor {bad[0]!r} {what} from its recorded checksum "
                                     f"({len(bad)} of {len(expected)} tensors fail)")


def check_finite(state: dict[str, Tensor], source: str) -> None:
    """Refuse weights holding NaN or Inf, naming the first such tensor.

    A sum is the fast test; only a non-finite sum (or an overflowing one) is checked element-wise.
    """
    for name, t in state.items():
        if not isinstance(t, Tensor) or not t.is_floating_point() or t.numel() == 0:
            continue
        if torch.isfinite(t.sum()) or torch.isfinite(t).all():
            continue
        bad = int((~torch.isfinite(t)).sum())
        raise CorruptCheckpointError(f"{source}: weight {name!r} holds {bad} non-finite value(s) (NaN/Inf) "
                                     f"of {t.numel()}; refusing to use it")


def export_metadata(tensors: dict[str, Tensor]) -> dict[str, str]:
    """Safetensors metadata entry recording the checksums of an export's tensors."""
    return {CHECKSUM_KEY: json.dumps({"algorithm": ALGORITHM, "tensors": checksums(tensors)})}


def verify_export(metadata: dict[str, str], tensors: dict[str, Tensor], source: str) -> None:
    """Check an export's tensors against its metadata record (exports without one pass)."""
    if CHECKSUM_KEY in metadata:
        compare(json.loads(metadata[CHECKSUM_KEY])["tensors"], checksums(tensors), source)
