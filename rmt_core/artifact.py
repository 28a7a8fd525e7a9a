"""The mask file: the per-task source of truth, a few bits per masked-out weight (numpy only).

A mask is a long run of ones (kept weights) with rare zeros. All mask tensors are concatenated in
name order and the gaps between consecutive minority symbols are Golomb-Rice coded with the
parameter k that minimises the size. A Rice code of a geometric gap length is within a few percent of
the Bernoulli entropy n*H(p), so the file stays close to the information the mask really holds.
Quotients (unary) and remainders (k bits each) live in two bit streams so both directions are
vectorised.

Layout:  b"RMTM" | u32 header length | header JSON | quotient bits | remainder bits | u32 CRC32 of all before.
"""
from __future__ import annotations

import json
import math
import os
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np

MAGIC = b"RMTM"
VERSION = 1


class MaskFileError(ValueError):
    pass


def _rice_sizes(gaps: np.ndarray) -> tuple[int, int]:
    """(best k, total bits) over k = 0..31."""
    best = (0, None)
    for k in range(32):
        bits = int((gaps >> k).sum()) + gaps.size * (k + 1)
        if best[1] is None or bits < best[1]:
            best = (k, bits)
        if k and not (gaps >> k).any():
            break
    return best


def encode_masks(masks: dict[str, np.ndarray], meta: dict | None = None) -> bytes:
    """Encode boolean masks (True = weight kept) into the RMTM byte format."""
    names = sorted(masks)
    flat = np.concatenate([np.asarray(masks[n], dtype=bool).ravel() for n in names]) if names else np.zeros(0, bool)
    n = int(flat.size)
    ones = int(flat.sum())
    minority = 0 if ones >= n - ones else 1  # code the rarer symbol's positions
    positions = np.flatnonzero(flat == bool(minority)).astype(np.int64)
    gaps = np.diff(positions, prepend=-1) - 1  # run length of majority symbols before each minority one
    k, _ = _rice_sizes(gaps) if gaps.size else (0, 0)
    q = gaps >> k
    # unary quotients: q ones then a zero, laid out at once by marking where each zero falls
    unary = np.ones(int(q.sum()) + gaps.size, dtype=np.uint8)
    unary[np.cumsum(q + 1) - 1] = 0
    if k:
        rem = (gaps & ((1 << k) - 1)).astype(np.uint64)
        rem_bits = ((rem[:, None] >> np.arange(k - 1, -1, -1, dtype=np.uint64)) & 1).astype(np.uint8).ravel()
    else:
        rem_bits = np.zeros(0, np.uint8)
    header = {
        "version": VERSION,
        "tensors": [{"name": name, "shape": list(np.shape(masks[name]))} for name in names],
        "n": n, "minority": minority, "count": int(gaps.size), "k": k,
        "unary_bits": int(unary.size), "rem_bits": int(rem_bits.size),
        "meta": meta or {},
    }
    head = json.dumps(header, separators=(",", ":")).encode()
    body = MAGIC + struct.pack("<I", len(head)) + head + np.packbits(unary).tobytes() + np.packbits(rem_bits).tobytes()
    return body + struct.pack("<I", zlib.crc32(body))


def decode_masks(data: bytes) -> tuple[dict[str, np.ndarray], dict]:
    """Inverse of encode_masks: (masks, meta). Raises MaskFileError on anything malformed."""
    if len(data) < 12 or data[:4] != MAGIC:
        raise MaskFileError("not a mask file (bad magic)")
    (crc,) = struct.unpack("<I", data[-4:])
    if zlib.crc32(data[:-4]) != crc:
        raise MaskFileError("mask file is corrupt (CRC mismatch)")
    (hlen,) = struct.unpack("<I", data[4:8])
    header = json.loads(data[8:8 + hlen])
    if header.get("version") != VERSION:
        raise MaskFileError(f"mask file version {header.get('version')} is not supported")
    offset = 8 + hlen
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
    masks, start = {}, 0
    for tensor in header["tensors"]:
        size = int(np.prod(tensor["shape"])) if tensor["shape"] else 1
        masks[tensor["name"]] = flat[start:start + size].reshape(tensor["shape"])
        start += size
    if start != n:
        raise MaskFileError("mask file is corrupt (shapes do not add up)")
    return masks, header["meta"]


def entropy_bound_bytes(masks: dict[str, np.ndarray]) -> float:
    """n * H(p) / 8: the fewest bytes any code for an i.i.d. mask with this keep-rate can average."""
    n = sum(int(np.size(m)) for m in masks.values())
    if n == 0:
        return 0.0
    p = sum(int(np.count_nonzero(m)) for m in masks.values()) / n
    if p in (0.0, 1.0):
        return 0.0
    return n * -(p * math.log2(p) + (1 - p) * math.log2(1 - p)) / 8


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    """Write to a temp file in the same directory, fsync, rename: readers see all or nothing."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_masks(path: Path | str, masks: dict[str, np.ndarray], meta: dict | None = None) -> int:
    data = encode_masks(masks, meta)
    atomic_write_bytes(path, data)
    return len(data)


def load_masks(path: Path | str) -> tuple[dict[str, np.ndarray], dict]:
    return decode_masks(Path(path).read_bytes())
