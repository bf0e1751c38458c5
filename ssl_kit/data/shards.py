"""WebDataset tar shards: name patterns, sample counts, sequential and random-access reading.

A shard is a plain tar whose members are grouped into samples by name: ``n01/img1.jpg``,
``n01/img1.cls`` and ``n01/img1.json`` are one sample with key ``n01/img1`` (the format that
img2dataset writes and open_clip reads). The image is the first member with an image extension;
the label comes from a ``cls`` member (an integer as text, any ``*.cls`` suffix too) or a
``json`` member's ``label`` / ``cls`` field, and is ``UNLABELED`` (-1) otherwise.

``data.root`` names the shards: a brace pattern (``/data/in1k/train-{000000..000146}.tar``,
expanded by ``webdataset``), a glob, a folder (its ``*.tar``), a ``pipe:`` command (streamed,
e.g. ``pipe:aws s3 cp s3://b/train-000000.tar -``) or an fsspec URL (``s3://``, ``gs://``,
``https://``, ...). Sample counts come from a ``sizes.json`` beside the shards (open_clip's
format, written by ``python -m ssl_kit shard``) or from reading the tar headers once.

Training streams shards (see :mod:`ssl_kit.data.shard_stream`); :class:`ShardSamples` also
reads single samples by index (evaluation, the validation split), which needs seekable shards:
local files or fsspec URLs, not ``pipe:``.
"""

from __future__ import annotations

import bisect
import glob
import json
import os
import tarfile
import warnings
from functools import lru_cache
from pathlib import Path
from collections.abc import Sequence
from typing import IO, Iterator

from PIL import Image

from webdataset.gopen import gopen
from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_iterator

from ssl_kit.data.datasets import IMG_EXTENSIONS, UNLABELED, LabeledImages
from ssl_kit.errors import BadImageError, MissingFileError, UserError

IMAGE_SUFFIXES = tuple(e.lstrip(".") for e in IMG_EXTENSIONS)
#: Beside the shards: ``{"train-000000.tar": 5000, ...}`` (open_clip's file; ``shard`` writes it).
SIZES_FILE = "sizes.json"
#: Shard indices kept per process for random access (each is ~100 bytes per sample).
INDEX_CACHE = 16


def _is_url(name: str) -> bool:
    return "://" in name and not name.startswith("file://")


def _local(name: str) -> str:
    return name[len("file://"):] if name.startswith("file://") else name


def expand_shards(pattern: str) -> list[str]:
    """Shard names from ``pattern``: braces, ``::``-joined lists, globs, a folder of ``*.tar``.

    Raises:
        FileNotFoundError: no shard matches, or a local shard in the pattern does not exist
            (the message names the pattern and the missing shards).
    """
    names = []
    for name in expand_urls(pattern):
        local = _local(name)
        if name.startswith("pipe:") or _is_url(name):
            names.extend(_expand_url(name))
        elif os.path.isdir(local):
            names.extend(sorted(glob.glob(os.path.join(glob.escape(local), "*.tar"))))
        elif glob.has_magic(local):
            names.extend(sorted(glob.glob(local)))
        else:
            names.append(local)
    if not names:
        raise MissingFileError(f"data.root {pattern!r} matches no shard (expected tar files: a brace pattern "
                                f"like 'train-{{000000..000146}}.tar', a glob, or a folder of *.tar).")
    missing = [n for n in names if not (n.startswith("pipe:") or _is_url(n) or os.path.isfile(n))]
    if missing:
        raise MissingFileError(f"data.root {pattern!r}: {len(missing)} of {len(names)} shards do not exist, "
                                f"e.g. {missing[0]!r}.")
    return names


def _expand_url(name: str) -> list[str]:
    """A pipe: command as is; an fsspec URL with a glob expanded (other URLs are checked when read)."""
    if name.startswith("pipe:") or not glob.has_magic(name.split("://", 1)[1]):
        return [name]
    import fsspec

    fs, _, paths = fsspec.get_fs_token_paths(name)
    return [fs.unstrip_protocol(p) for p in sorted(paths)]


def open_shard(name: str, seekable: bool = False) -> IO[bytes]:
    """Open a shard for reading: local file, fsspec URL (seekable) or ``pipe:`` command (stream).

    Raises:
        OSError: naming the shard, when it cannot be opened (or is a ``pipe:`` and ``seekable``).
    """
    try:
        if name.startswith("pipe:"):
            if seekable:
                raise BadImageError("reading single samples (evaluation, the validation split) needs a seekable shard: "
                              "a local file or an fsspec URL, not a pipe: command")
            return gopen(name, "rb")
        if _is_url(name):
            import fsspec

            return fsspec.open(name, "rb").open()
        return open(_local(name), "rb")
    except Exception as err:
        raise BadImageError(f"shard {name!r}: cannot open it: {err}") from err


# --- samples ------------------------------------------------------------------------------------
def image_suffix(sample: dict) -> str | None:
    """The member suffix holding the sample's image (``jpg``, ``png``, ...), or None."""
    for suffix in sample:
        if not suffix.startswith("__") and suffix.rsplit(".", 1)[-1] in IMAGE_SUFFIXES:
            return suffix
    return None


def label_of(members: dict) -> int:
    """The sample's label from a ``cls`` member or a ``json`` member's ``label`` / ``cls``, else -1.

    Args:
        members: suffix -> bytes (or a callable returning the bytes, to read lazily).
    """
    for suffix, value in members.items():
        if suffix == "cls" or suffix.endswith(".cls"):
            return int(_bytes(value).decode().strip())
    for suffix, value in members.items():
        if suffix == "json" or suffix.endswith(".json"):
            meta = json.loads(_bytes(value))
            for field in ("label", "cls"):
                if isinstance(meta, dict) and isinstance(meta.get(field), int):
                    return meta[field]
    return UNLABELED


def side_info(members: dict, key: str, suffix: str) -> dict:
    """``img.info`` for a sample's image: its ``key`` and ``relpath`` (the ``json`` member's
    ``relpath``, as ``shard`` records it, else ``KEY.SUFFIX``; saliency masks are matched by it)."""
    relpath = f"{key}.{suffix}"
    if "json" in members:
        try:
            meta = json.loads(_bytes(members["json"]))
            relpath = meta["relpath"] if isinstance(meta, dict) and isinstance(meta.get("relpath"), str) else relpath
        except ValueError:
            pass
    return {"key": key, "relpath": relpath}


def _bytes(value) -> bytes:
    return value() if callable(value) else value


def stream_samples(name: str) -> Iterator[dict]:
    """The samples of one shard in tar order (``__key__`` and suffix -> bytes), read sequentially.

    Raises:
        OSError: naming the shard when it is not a tar or its data ends inside a member.
    """
    stream = open_shard(name)
    try:
        files = ({**f, "__url__": name} for f in tar_file_iterator(stream))
        yield from group_by_keys(files)
    except (tarfile.TarError, EOFError, ValueError) as err:
        reason = str(err.args[0]).split(" @ ")[0] if err.args else type(err).__name__
        raise BadImageError(f"shard {name!r} is not a readable tar file ({reason}).") from None
    finally:
        stream.close()


def scan_shard(name: str) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """Index a shard from its tar headers: ``[(key, {suffix: (data offset, size)}), ...]`` in tar order.

    Seeks over member data on seekable shards; streams through ``pipe:`` shards.

    Raises:
        OSError: naming the shard when it is not a tar or is truncated.
    """
    samples: list[tuple[str, dict]] = []
    f = open_shard(name)
    try:
        with tarfile.open(fileobj=f, mode="r|" if name.startswith("pipe:") else "r:") as tar:
            for member in tar:
                key, suffix = base_plus_ext(member.name) if member.isreg() else (None, None)
                if key is None or os.path.basename(member.name).startswith("__"):
                    continue
                if not samples or samples[-1][0] != key:
                    samples.append((key, {}))
                samples[-1][1][suffix.lower()] = (member.offset_data, member.size)
    except (tarfile.TarError, EOFError) as err:
        raise BadImageError(f"shard {name!r} is not a readable tar file ({err}).") from None
    finally:
        f.close()
    return samples


def check_shard_file(name: str) -> None:
    """Cheap checks of a local shard before training: a tar header first, the end-of-archive at the end.

    Raises:
        OSError: naming the shard when it is not a tar, or is truncated (no end-of-archive blocks).
    """
    if name.startswith("pipe:") or _is_url(name):
        return
    path = _local(name)
    with open(path, "rb") as f:
        head = f.read(tarfile.BLOCKSIZE)
        f.seek(0, os.SEEK_END)
        end = f.tell()
        f.seek(max(0, end - 2 * tarfile.BLOCKSIZE))
        tail = f.read()
    try:
        tarfile.TarInfo.frombuf(head, tarfile.ENCODING, "surrogateescape")
    except tarfile.HeaderError as err:
        raise BadImageError(f"shard {name!r} is not a tar file ({err}).") from None
    if end % tarfile.BLOCKSIZE or tail.strip(b"\0"):
        raise BadImageError(f"shard {name!r} is truncated: it does not end with the tar end-of-archive blocks "
                      f"({end} bytes). Re-copy or re-write it.")


def read_sizes(names: Sequence[str]) -> dict[str, int]:
    """Sample counts from ``sizes.json`` files beside the shards (keyed by file name), where present."""
    sizes: dict[str, int] = {}
    by_folder: dict[str, list[str]] = {}
    for name in names:
        if not name.startswith("pipe:"):
            by_folder.setdefault(name.rsplit("/", 1)[0] if "/" in name else "", []).append(name)
    for folder, members in by_folder.items():
        found = _read_json(f"{folder}/{SIZES_FILE}" if folder else SIZES_FILE)
        for name in members:
            count = found.get(name.rsplit("/", 1)[-1])
            if isinstance(count, int):
                sizes[name] = count
    return sizes


def _read_json(path: str) -> dict:
    """A JSON object from a local path or fsspec URL; {} when absent or unreadable."""
    try:
        if _is_url(path):
            import fsspec

            with fsspec.open(path, "rb") as f:
                found = json.load(f)
        else:
            found = json.loads(Path(_local(path)).read_text())
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def shard_sizes(names: Sequence[str]) -> list[int]:
    """Samples per shard: ``sizes.json`` where it lists a shard, else counted from the tar headers."""
    known = read_sizes(names)
    unknown = [n for n in names if n not in known]
    if unknown:
        print(f"counting the samples of {len(unknown)} shard(s) from their tar headers "
              f"(a {SIZES_FILE} beside the shards skips this; `python -m ssl_kit shard` writes one)")
    return [known[n] if n in known else len(scan_shard(n)) for n in names]


@lru_cache(maxsize=INDEX_CACHE)
def _cached_index(name: str) -> list:
    return scan_shard(name)


def read_member(name: str, offset: int, size: int) -> bytes:
    """``size`` bytes at ``offset`` of a seekable shard (opened per call: safe in forked workers)."""
    with open_shard(name, seekable=True) as f:
        f.seek(offset)
        data = f.read(size)
    if len(data) != size:
        raise BadImageError(f"shard {name!r} is truncated: a member at byte {offset} ends early.")
    return data


# --- random access ------------------------------------------------------------------------------
class ShardSamples(LabeledImages):
    """WebDataset shards as an indexable data set: sample ``i`` is the ``i``-th sample of the
    shards taken in order (the training stream uses the same numbering for its per-sample seeds).

    Only sample counts are read at construction (``sizes.json`` or tar headers); a shard's index
    (member offsets) is read on first access to one of its samples; labels on first use.

    Args:
        root: the shards (see :func:`expand_shards`).
        transform: applied to each PIL image.
        classes: fix the class list (e.g. the training split's).
        bad_images: ``error`` refuses a truncated local shard at once; ``skip`` warns about it.
    """

    def __init__(self, root: str, transform=None, classes: list[str] | None = None, bad_images: str = "error") -> None:
        super().__init__(transform)
        self.root, self.bad_images = root, bad_images
        self.shards = expand_shards(root)
        for name in self.shards:
            try:
                check_shard_file(name)
            except OSError as err:
                if bad_images == "error" or "truncated" not in str(err):
                    raise
                warnings.warn(f"{err} Its missing samples are replaced (bad_images='skip').", stacklevel=2)
        self.sizes = shard_sizes(self.shards)
        self.starts = [0]
        for n in self.sizes:
            self.starts.append(self.starts[-1] + n)
        self._classes = list(classes) if classes is not None else None
        self.labels = _ShardLabels(self)

    def __len__(self) -> int:
        return self.starts[-1]

    def check_random_access(self, purpose: str) -> None:
        """Raise unless single samples can be read (``pipe:`` shards can only be streamed).

        Raises:
            ValueError: naming the first ``pipe:`` shard and ``purpose``.
        """
        piped = [n for n in self.shards if n.startswith("pipe:")]
        if piped:
            raise UserError(f"{purpose} reads single samples, which {piped[0]!r} cannot serve (pipe: shards are "
                             f"streamed): use data.val_fraction=0, or a data.val_root of local or fsspec shards "
                             f"or a folder.")

    def locate(self, index: int) -> tuple[int, int]:
        """(shard number, position in the shard) of sample ``index``."""
        shard = bisect.bisect_right(self.starts, index) - 1
        return shard, index - self.starts[shard]

    @property
    def classes(self) -> list[str]:
        if self._classes is None:
            self._classes = [str(c) for c in range(max(self.labels) + 1)] if self.has_labels else []
        return self._classes

    def _sample(self, index: int) -> tuple[str, str, dict]:
        """(shard, key, {suffix: (offset, size)}) of sample ``index``."""
        shard, pos = self.locate(index)
        name = self.shards[shard]
        entries = _cached_index(name)
        if pos >= len(entries):
            raise BadImageError(f"shard {name!r}: sample {pos} is missing: the shard holds {len(entries)} samples, "
                          f"{self.sizes[shard]} were expected (truncated, or a stale {SIZES_FILE}).")
        return name, *entries[pos]

    def _image_bytes(self, index: int) -> tuple[bytes, str, dict]:
        name, key, members = self._sample(index)
        suffix = image_suffix(members)
        if suffix is None:
            raise BadImageError(f"shard {name!r}: sample {key!r} has no image (members: {', '.join(members) or 'none'}; "
                          f"expected one of {', '.join(IMAGE_SUFFIXES)}).")
        meta = {"json": lambda: read_member(name, *members["json"])} if "json" in members else {}
        return read_member(name, *members[suffix]), f"{name}:{key}.{suffix}", side_info(meta, key, suffix)

    def load(self, index: int) -> Image.Image:
        from ssl_kit.data.decode import decode_rgb

        data, where, info = self._image_bytes(index)
        img = decode_rgb(data, where)
        img.info.update(info)
        return img

    def load_encoded(self, index: int):
        from ssl_kit.data.decode import EncodedImage

        return EncodedImage.open(*self._image_bytes(index))


class _ShardLabels(Sequence):
    """The labels of :class:`ShardSamples`, read shard by shard when first needed."""

    def __init__(self, data: ShardSamples) -> None:
        self.data = data
        self._per_shard: dict[int, list[int]] = {}

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        shard, pos = self.data.locate(index if index >= 0 else index + len(self))
        return self.shard(shard)[pos]

    def __iter__(self) -> Iterator[int]:
        for shard in range(len(self.data.shards)):
            yield from self.shard(shard)

    def shard(self, shard: int) -> list[int]:
        """Labels of one shard's samples (padded with -1 where the shard holds fewer than counted)."""
        if shard not in self._per_shard:
            name, n = self.data.shards[shard], self.data.sizes[shard]
            found = _read_labels(name)
            self._per_shard[shard] = (found + [UNLABELED] * n)[:n]
        return self._per_shard[shard]


def _read_labels(name: str) -> list[int]:
    """Every sample's label in a shard (streamed for ``pipe:``, else seeking to the small members)."""
    if name.startswith("pipe:"):
        return [label_of(s) for s in stream_samples(name)]
    with open_shard(name, seekable=True) as f:
        def reader(offset: int, size: int):
            return lambda: (f.seek(offset), f.read(size))[1]

        return [label_of({k: reader(*v) for k, v in members.items()}) for _, members in _cached_index(name)]
