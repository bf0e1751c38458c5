"""``python -m ssl_kit shard``: write an image folder as WebDataset tar shards.

Each sample is the image file's original bytes (never re-encoded) as ``KEY.<ext>``, plus
``KEY.cls`` (the class index) and ``KEY.json`` (``relpath``, ``label``, ``class``) when the images
sit in class sub-folders. Shards are written one at a time to a temporary file, synced and
renamed into place, so a shard that exists is complete; an interrupted run started again with
the same arguments skips the complete shards. ``sizes.json`` (sample counts, open_clip's format)
is written last.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ssl_kit.data.datasets import ImageFolder
from ssl_kit.data.shards import SIZES_FILE
from ssl_kit.errors import UserError

#: Written first into the output folder: what is being converted, so a restart can check it is the same job.
MANIFEST = "shard_manifest.json"


@dataclass
class FolderSource:
    """The image folder to convert.

    Args:
        root: folder of images (recursive; first-level sub-folders are the classes).
    """

    root: str


def shard(
    *, data: FolderSource, output: str, shard_size: int = 5000, prefix: str = "train", shuffle: bool = True,
    seed: int = 0,
) -> dict:
    """Convert an image folder into WebDataset tar shards (resumable; labels from class sub-folders).

    Args:
        data: the image folder (``--data.root DIR``).
        output: folder for the shards (created).
        shard_size: images per shard.
        prefix: shard file names are ``PREFIX-000000.tar``, ``PREFIX-000001.tar``, ...
        shuffle: store the images in a seeded random order, so each shard mixes the classes
            (training reads shards sequentially); False keeps the folder's sorted order.
        seed: seed of that order.

    Returns:
        ``{"shards": n, "images": n, "written": n, "skipped": n, "pattern": "..."}``.
    """
    if shard_size < 1:
        raise UserError(f"shard_size={shard_size} is not allowed: it must be >= 1.")
    folder = ImageFolder(data.root)
    order = torch.randperm(len(folder), generator=torch.Generator().manual_seed(seed)).tolist() if shuffle \
        else list(range(len(folder)))
    out = Path(output)
    names = [f"{prefix}-{k:06d}.tar" for k in range(-(-len(order) // shard_size))]
    _claim(out, {"root": str(Path(data.root).resolve()), "images": len(order), "shard_size": shard_size,
                 "prefix": prefix, "shuffle": shuffle, "seed": seed, "files_hash": _files_hash(folder)})
    todo = [k for k, name in enumerate(names) if not (out / name).is_file()]
    from tqdm import tqdm

    with tqdm(total=sum(len(order[k * shard_size:(k + 1) * shard_size]) for k in todo), unit="img",
              desc=f"shard -> {out}", disable=None) as bar:
        for k in todo:
            _write_shard(folder, order[k * shard_size:(k + 1) * shard_size], k * shard_size, out / names[k], bar)
    sizes = {name: len(order[k * shard_size:(k + 1) * shard_size]) for k, name in enumerate(names)}
    _atomic_write(out / SIZES_FILE, json.dumps(sizes, indent=1).encode())
    pattern = f"{out}/{prefix}-{{{0:06d}..{len(names) - 1:06d}}}.tar"
    print(f"{len(names)} shards ({len(order)} images, {len(folder.classes)} classes) in {out}: "
          f"wrote {len(todo)}, kept {len(names) - len(todo)} complete. Train with --data.dataset shards "
          f"--data.root \"{pattern}\"")
    return {"shards": len(names), "images": len(order), "written": len(todo), "skipped": len(names) - len(todo),
            "pattern": pattern}


def _claim(out: Path, manifest: dict) -> None:
    """Create ``out`` and record the job; refuse a folder that holds another conversion's shards."""
    if out.exists() and not out.is_dir():
        raise UserError(f"output {str(out)!r} is a file, not a folder.")
    out.mkdir(parents=True, exist_ok=True)
    path = out / MANIFEST
    if path.is_file():
        found = json.loads(path.read_text())
        if found != manifest:
            changed = sorted(k for k in manifest if found.get(k) != manifest[k])
            raise UserError(f"output {str(out)!r} holds shards of another conversion ({', '.join(changed)} differ; "
                             f"see {MANIFEST}): use another --output, or delete that folder to start over.")
    else:
        _atomic_write(path, json.dumps(manifest, indent=1).encode())


def _files_hash(folder: ImageFolder) -> str:
    """A digest of the relative paths and sizes, so a restart notices a changed folder."""
    import hashlib

    h = hashlib.sha256()
    for f in folder.files:
        h.update(f"{f.relative_to(folder.root).as_posix()}\0{f.stat().st_size}\n".encode())
    return h.hexdigest()[:16]


def _write_shard(folder: ImageFolder, indices: list[int], first: int, path: Path, bar) -> None:
    """Write one shard to a temporary file, sync it, then rename it into place (atomic)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for n, i in enumerate(indices):
                _add_sample(tar, folder, i, f"{first + n:09d}")
                bar.update(1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _add_sample(tar: tarfile.TarFile, folder: ImageFolder, i: int, key: str) -> None:
    src = folder.files[i]
    relpath = src.relative_to(folder.root).as_posix()
    members = {src.suffix.lower().lstrip("."): src.read_bytes()}
    if folder.has_labels:
        label = folder.labels[i]
        members["cls"] = str(label).encode()
        members["json"] = json.dumps({"relpath": relpath, "label": label, "class": folder.classes[label]}).encode()
    else:
        members["json"] = json.dumps({"relpath": relpath}).encode()
    for suffix, payload in members.items():
        info = tarfile.TarInfo(f"{key}.{suffix}")
        info.size, info.mode, info.mtime = len(payload), 0o644, 0  # fixed metadata: reproducible shards
        tar.addfile(info, io.BytesIO(payload))


def _atomic_write(path: Path, payload: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
