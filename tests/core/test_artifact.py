from pathlib import Path

import numpy as np
import pytest

from rmt_core.artifact import (MaskFileError, decode_masks, decode_packed, encode_masks, entropy_bound_bytes, load_masks,
                               save_masks)

DATA = Path(__file__).parent / "data"


@pytest.mark.parametrize("drop", [0.0, 1e-4, 0.01, 0.05, 0.3, 0.5, 0.8, 1.0])
def test_round_trip_is_exact(drop):
    rng = np.random.default_rng(1)
    masks = {"b.w": rng.random((64, 32)) > drop, "a.w": rng.random((5, 3, 4, 4)) > drop, "c": np.ones(1, bool)}
    got, meta = decode_masks(encode_masks(masks, {"method": "r-amt"}))
    assert meta == {"method": "r-amt"}
    assert set(got) == set(masks)
    for name in masks:
        assert got[name].dtype == bool and np.array_equal(got[name], masks[name]), name


@pytest.mark.parametrize("drop", [0.005, 0.03, 0.2])
def test_size_stays_near_the_entropy_bound_even_for_iid_masks(drop):
    # i.i.d. bits are the general-purpose compressor's worst case (real masks flip in rows and heads and
    # compress below this bound); measured 1.04-1.34x here, see bench/RESULTS-layout.md
    rng = np.random.default_rng(2)
    masks = {"w": rng.random((768, 768)) > drop}
    size = len(encode_masks(masks))
    assert size <= 1.4 * entropy_bound_bytes(masks) + 300


def test_structured_masks_compress_far_below_the_iid_bound():
    masks = {"w": np.ones((768, 768), bool)}
    masks["w"][::37] = False  # whole rows, as a tuned mask drops them
    assert len(encode_masks(masks)) < 0.1 * entropy_bound_bytes(masks)


def test_old_rice_coded_files_still_load():
    """A file written by the retired Golomb-Rice encoder (RMTM v1), committed as a fixture."""
    masks, meta = load_masks(DATA / "old-format-v1.rmtm")
    assert meta == {"backbone": "rmt-tiny-vit", "method": "r-amt"}
    rng = np.random.default_rng(20261130)  # how the fixture was made
    expected = {"visual.transformer.resblocks.0.attn.in_proj_weight": rng.random((192, 64)) > 0.03,
                "visual.conv1.weight": rng.random((64, 3, 8, 8)) > 0.01,
                "visual.transformer.resblocks.0.attn.out_proj.weight": np.ones((64, 64), bool)}
    assert set(masks) == set(expected)
    for name in expected:
        assert masks[name].dtype == bool and np.array_equal(masks[name], expected[name]), name
    assert encode_masks(masks)[:4] == b"RMT3"  # re-saving writes the current format


def test_clustered_masks_round_trip():
    masks = {"w": np.ones((100, 100), bool)}
    masks["w"][10:20] = False  # whole rows masked: long runs of the minority symbol
    got, _ = decode_masks(encode_masks(masks))
    assert np.array_equal(got["w"], masks["w"])


def test_corruption_is_detected(tmp_path):
    data = bytearray(encode_masks({"w": np.random.default_rng(0).random((50, 50)) > 0.1}))
    data[len(data) // 2] ^= 0xFF
    with pytest.raises(MaskFileError, match="CRC"):
        decode_masks(bytes(data))
    with pytest.raises(MaskFileError, match="magic"):
        decode_masks(b"PK\x03\x04" + bytes(20))


def test_save_is_atomic_and_loads_back(tmp_path):
    masks = {"w": np.random.default_rng(0).random((10, 10)) > 0.5}
    n = save_masks(tmp_path / "m.rmtm", masks)
    assert (tmp_path / "m.rmtm").stat().st_size == n
    assert [p.name for p in tmp_path.iterdir()] == ["m.rmtm"]  # no temp file left behind
    assert np.array_equal(load_masks(tmp_path / "m.rmtm")[0]["w"], masks["w"])


def test_lzma_files_of_version_2_still_load():
    """RMT2 (packbits + raw LZMA2), what classifiers published before the zlib switch hold; written here the
    way the old encoder wrote it."""
    import json
    import lzma
    import struct
    import zlib

    rng = np.random.default_rng(3)
    masks = {"b.w": rng.random((40, 24)) > 0.05, "a.w": rng.random((7, 3)) > 0.3}
    names = sorted(masks)
    flat = np.concatenate([masks[n].ravel() for n in names])
    header = json.dumps({"version": 2, "tensors": [{"name": n, "shape": list(masks[n].shape)} for n in names],
                         "n": int(flat.size), "codec": "packbits+lzma", "meta": {"method": "amt"}}).encode()
    body = b"RMT2" + lzma.compress(struct.pack("<I", len(header)) + header + np.packbits(flat).tobytes(),
                                   format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2, "preset": 6}])
    got, meta = decode_masks(body + struct.pack("<I", zlib.crc32(body)))
    assert meta == {"method": "amt"} and set(got) == set(masks)
    for name in masks:
        assert np.array_equal(got[name], masks[name])


@pytest.mark.parametrize("shapes", [[(3,), (5,), (64, 3)], [(8, 8), (1,), (130,)], [(2,), (2,)], [(70,), (9, 9)]])
def test_packed_masks_answer_all_kept_and_unpack_at_any_bit_offset(shapes):
    """Tensors start at arbitrary bit offsets in the packed stream; all_kept reads the packed bytes and must
    still see a single flipped bit at either edge or inside."""
    rng = np.random.default_rng(len(shapes))
    base = {f"t{i}": np.ones(shape, bool) for i, shape in enumerate(shapes)}
    packed = decode_packed(encode_masks(base))
    assert all(packed.all_kept(n) for n in base)
    for name, value in base.items():
        for where in {0, value.size // 2, value.size - 1}:
            masks = {k: v.copy() for k, v in base.items()}
            masks[name].reshape(-1)[where] = False
            packed = decode_packed(encode_masks(masks))
            for other in base:
                assert packed.all_kept(other) == (other != name), (name, where, other)
                assert np.array_equal(packed.unpack(other), masks[other])
    noisy = {k: rng.random(v.shape) > 0.5 for k, v in base.items()}
    packed = decode_packed(encode_masks(noisy))
    assert packed.to_dict().keys() == noisy.keys()
    assert all(np.array_equal(packed.unpack(k), v) for k, v in noisy.items())
