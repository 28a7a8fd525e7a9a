"""The mask file: the per-task source of truth, one bit per maskable weight, compressed (numpy + stdlib).

All mask tensors are concatenated in name order, packed eight to a byte (``numpy.packbits``) and
compressed with zlib. Real tuned masks are not i.i.d. (whole rows and heads flip together), so a
general-purpose compressor beats a hand-written Golomb-Rice coder of the gaps on them; see
bench/RESULTS-layout.md for the measurement that retired that coder. zlib rather than LZMA: LZMA's
file is 5% (real masks) to 13% (i.i.d.) smaller, but a classifier's mask is decoded on every cold load
and LZMA took 76 ms of a ViT-B-32 load where zlib takes 12 ms.

Layout (RMT3):  b"RMT3" | zlib(u32 header length | header JSON | packbits(bits)) | u32 CRC32 of all before.
(The header, which names every tensor, is compressed with the bits: it is ~10% of a small mask's file.)
Older files still load: RMT2 (the same with LZMA2 raw) and RMTM (Rice-coded gaps); nothing writes them.
``decode_packed`` keeps the bits packed: serving unpacks each tensor where it bakes it, in parallel.
"""
from __future__ import annotations

import json
import lzma
import math
import struct
import zlib
from pathlib import Path

import numpy as np

from .files import atomic_write_bytes  # noqa: F401 - also imported from here (pipeline, bench)
from .head import HEAD_FILE

MAGIC = b"RMT3"
VERSION = 3
LZMA_MAGIC = b"RMT2"  # version 2: the same payload compressed with raw LZMA2
LEGACY_MAGIC = b"RMTM"
MASK_FILE = "mask.rmt"
LEGACY_MASK_FILE = "mask.rmtm"  # what classifiers before the base+mask+head layout hold


class MaskFileError(ValueError):
    pass


def _flatten(masks: dict[str, np.ndarray]) -> tuple[list[str], np.ndarray]:
    names = sorted(masks)
    flat = np.concatenate([np.asarray(masks[n], dtype=bool).ravel() for n in names]) if names else np.zeros(0, bool)
    return names, flat


def encode_masks(masks: dict[str, np.ndarray], meta: dict | None = None, level: int = 9) -> bytes:
    """Encode boolean masks (True = weight kept) into the RMT3 byte format. ``level``: zlib's (any level
    decodes the same; 9 takes ~7 s on a dense i.i.d. ViT-B-32 mask where 1 takes 0.1 s, for a file 18% larger:
    benches that write hundreds of synthetic masks use 1)."""
    names, flat = _flatten(masks)
    header = {
        "version": VERSION,
        "tensors": [{"name": name, "shape": list(np.shape(masks[name]))} for name in names],
        "n": int(flat.size), "codec": "packbits+zlib", "meta": meta or {},
    }
    head = json.dumps(header, separators=(",", ":")).encode()
    body = MAGIC + zlib.compress(struct.pack("<I", len(head)) + head + np.packbits(flat).tobytes(), level)
    return body + struct.pack("<I", zlib.crc32(body))


class PackedMasks:
    """A decoded mask file whose bits are still packed: ``names``, ``shape(name)``, ``all_kept(name)`` (nothing
    flipped: checked on the packed bytes) and ``unpack(name)`` (a bool array). Unpacking 30 M bits takes tens of
    ms, so serving unpacks each tensor in the thread that bakes it."""

    def __init__(self, tensors: list[dict], packed: np.ndarray, n: int, meta: dict):
        self.meta = meta
        self.packed = packed
        self._where: dict[str, tuple[int, int, tuple]] = {}  # name -> (first bit, bits, shape)
        start = 0
        for tensor in tensors:
            shape = tuple(tensor["shape"])
            size = int(np.prod(shape)) if shape else 1
            self._where[tensor["name"]] = (start, size, shape)
            start += size
        if start != n:
            raise MaskFileError("mask file is corrupt (shapes do not add up)")
        if packed.size != (n + 7) // 8:
            raise MaskFileError("mask file is corrupt (length mismatch)")

    @property
    def names(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple:
        return self._where[name][2]

    def _bytes(self, name: str) -> tuple[np.ndarray, int, int]:
        start, size, _ = self._where[name]
        return self.packed[start // 8:(start + size + 7) // 8], start % 8, size

    def unpack(self, name: str) -> np.ndarray:
        raw, skip, size = self._bytes(name)
        return np.unpackbits(raw, count=skip + size)[skip:].view(bool).reshape(self.shape(name))

    def all_kept(self, name: str) -> bool:
        raw, skip, size = self._bytes(name)
        end = skip + size
        lo, hi = (skip + 7) // 8, end // 8  # the bytes wholly inside the tensor: compared packed
        if lo >= hi:  # a few bits inside one or two bytes
            return bool(np.unpackbits(raw)[skip:end].all())
        if not np.all(raw[lo:hi] == 0xFF):
            return False
        head = np.unpackbits(raw[:lo])[skip:] if skip else np.ones(0, np.uint8)
        tail = np.unpackbits(raw[hi:hi + 1])[:end - 8 * hi] if end % 8 else np.ones(0, np.uint8)
        return bool(head.all() and tail.all())

    def to_dict(self) -> dict[str, np.ndarray]:
        return {name: self.unpack(name) for name in self._where}


def decode_packed(data: bytes) -> PackedMasks:
    """A mask file (RMT3, RMT2 or RMTM) with its bits left packed. MaskFileError on anything malformed."""
    if len(data) < 12 or data[:4] not in (MAGIC, LZMA_MAGIC, LEGACY_MAGIC):
        raise MaskFileError("not a mask file (bad magic)")
    (crc,) = struct.unpack("<I", data[-4:])
    if zlib.crc32(data[:-4]) != crc:
        raise MaskFileError("mask file is corrupt (CRC mismatch)")
    if data[:4] == LEGACY_MAGIC:
        (hlen,) = struct.unpack("<I", data[4:8])
        header = json.loads(data[8:8 + hlen])
        flat = _decode_rice(data, header, 8 + hlen)
        return PackedMasks(header["tensors"], np.packbits(flat), int(header["n"]), header["meta"])
    try:
        if data[:4] == MAGIC:
            payload = zlib.decompress(data[4:-4])
        else:
            payload = lzma.decompress(data[4:-4], format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2}])
    except (zlib.error, lzma.LZMAError) as exc:
        raise MaskFileError(f"mask file is corrupt ({exc})") from exc
    (hlen,) = struct.unpack("<I", payload[:4])
    header = json.loads(payload[4:4 + hlen])
    if header.get("version") != (VERSION if data[:4] == MAGIC else 2):
        raise MaskFileError(f"mask file version {header.get('version')} is not supported")
    packed = np.frombuffer(payload, np.uint8, offset=4 + hlen)
    return PackedMasks(header["tensors"], packed, int(header["n"]), header["meta"])


def decode_masks(data: bytes) -> tuple[dict[str, np.ndarray], dict]:
    """Inverse of encode_masks, for RMT3 and the older RMT2/RMTM files: (masks, meta). MaskFileError on anything
    malformed."""
    packed = decode_packed(data)
    return packed.to_dict(), packed.meta


def _decode_rice(data: bytes, header: dict, offset: int) -> np.ndarray:
    """The RMTM v1 format: gaps between minority symbols, Golomb-Rice coded (quotient and remainder streams)."""
    if header.get("version") != 1:
        raise MaskFileError(f"mask file version {header.get('version')} is not supported")
    ub, rb = header["unary_bits"], header["rem_bits"]
    unary = np.unpackbits(np.frombuffer(data, np.uint8, (ub + 7) // 8, offset))[:ub]
    offset += (ub + 7) // 8
    rem_bits = np.unpackbits(np.frombuffer(data, np.uint8, (rb + 7) // 8, offset))[:rb]
    k, count, n = header["k"], header["count"], header["n"]
    zeros = np.flatnonzero(unary == 0)
    if zeros.size != count:
        raise MaskFileError("mask file is corrupt (run count mismatch)")
    q = np.diff(zeros, prepend=-1) - 1
    gaps = q << k
    if k:
        weights = (1 << np.arange(k - 1, -1, -1, dtype=np.int64))
        gaps = gaps + (rem_bits.reshape(count, k).astype(np.int64) * weights).sum(axis=1)
    positions = np.cumsum(gaps + 1) - 1
    if positions.size and positions[-1] >= n:
        raise MaskFileError("mask file is corrupt (position out of range)")
    flat = np.full(n, not header["minority"], dtype=bool)
    flat[positions] = bool(header["minority"])
    return flat


def entropy_bound_bytes(masks: dict[str, np.ndarray]) -> float:
    """n * H(p) / 8: the fewest bytes any code for an i.i.d. mask with this keep-rate can average."""
    n = sum(int(np.size(m)) for m in masks.values())
    if n == 0:
        return 0.0
    p = sum(int(np.count_nonzero(m)) for m in masks.values()) / n
    if p in (0.0, 1.0):
        return 0.0
    return n * -(p * math.log2(p) + (1 - p) * math.log2(1 - p)) / 8


def save_masks(path: Path | str, masks: dict[str, np.ndarray], meta: dict | None = None, level: int = 9) -> int:
    data = encode_masks(masks, meta, level)
    atomic_write_bytes(path, data)
    return len(data)


def load_masks(path: Path | str) -> tuple[dict[str, np.ndarray], dict]:
    return decode_masks(Path(path).read_bytes())


def load_packed(path: Path | str) -> PackedMasks:
    return decode_packed(Path(path).read_bytes())


def write_version_files(out_dir: Path | str, *, base_id: str, head, masks: dict[str, np.ndarray] | None = None,
                        meta: dict | None = None) -> dict:
    """Write what a classifier version holds besides its manifest: the mask file (when there is a mask) and
    head.npz. Returns the manifest fields that name them (base_id, mask_file, head_file, sizes, head summary)."""
    out_dir = Path(out_dir)
    fields = {"layout": "base+mask+head", "base_id": base_id, "mask_file": None, "mask_bytes": 0,
              "head_file": HEAD_FILE, "head": head.summary()}
    if masks:
        fields["mask_file"] = MASK_FILE
        fields["mask_bytes"] = save_masks(out_dir / MASK_FILE, masks, meta)
    fields["head_bytes"] = head.save(out_dir / HEAD_FILE)
    return fields
