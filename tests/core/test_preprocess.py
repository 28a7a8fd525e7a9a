import numpy as np
import open_clip
import pytest
from PIL import Image

from rmt_core.backbones import register_configs
from rmt_core.preprocess import PreprocessConfig, preprocess_image


@pytest.mark.parametrize("model", ["rmt-tiny-vit", "ViT-B-32"])
@pytest.mark.parametrize("size", [(640, 480), (97, 311), (224, 224), (20, 15), (1, 300)])
def test_matches_open_clip_eval_transform(model, size):
    register_configs()
    _, _, reference = open_clip.create_model_and_transforms(model, pretrained=None)
    cfg = open_clip.create_model(model).visual.preprocess_cfg
    ours = PreprocessConfig.from_dict(dict(cfg))
    rng = np.random.default_rng(sum(size))
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    expected = reference(img).numpy()
    got = preprocess_image(img, ours)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def test_non_rgb_modes_are_converted():
    cfg = PreprocessConfig(size=(32, 32), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    grey = Image.new("L", (50, 40), 128)
    assert preprocess_image(grey, cfg).shape == (3, 32, 32)


def test_unknown_options_are_refused():
    with pytest.raises(ValueError, match="resize_mode"):
        PreprocessConfig.from_dict({"size": 224, "mean": [0] * 3, "std": [1] * 3, "resize_mode": "longest"})


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P"])
def test_normalization_is_bit_identical_to_to_tensor_and_normalize_in_float32(mode):
    """The per-channel lookup table gives exactly what ToTensor + Normalize compute pixel by pixel in float32."""
    cfg = PreprocessConfig(size=(24, 24), mean=(0.48145466, 0.4578275, 0.40821073),
                           std=(0.26862954, 0.26130258, 0.27577711))
    rng = np.random.default_rng(3)
    img = Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).convert(mode)
    arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    expected = ((arr - np.asarray(cfg.mean, np.float32)) / np.asarray(cfg.std, np.float32)).transpose(2, 0, 1)
    got = preprocess_image(img, cfg)
    assert got.dtype == np.float32 and got.flags.c_contiguous
    assert np.array_equal(got, expected)
    assert np.array_equal(preprocess_image(img.resize((30, 24)), cfg)[:, :, :],
                          preprocess_image(img.resize((30, 24)).crop((3, 0, 27, 24)), cfg))
