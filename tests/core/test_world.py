"""The generated world (rmt_core.world) and the small CLIP pretrained on it (rmt_core/weights/rmt-world-vit.pt)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rmt_core import world

WEIGHTS = Path(world.__file__).parent / "weights" / "rmt-world-vit.pt"
CONFIGS = Path(world.__file__).parent / "model_configs"


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_same_seed_same_images_and_captions():
    a = world.sample_captioned(6, seed=3, size=48)
    b = world.sample_captioned(6, seed=3, size=48)
    c = world.sample_captioned(6, seed=4, size=48)
    assert [x[1] for x in a] == [x[1] for x in b]
    assert all(np.array_equal(pixels(x[0]), pixels(y[0])) for x, y in zip(a, b))
    assert any(not np.array_equal(pixels(x[0]), pixels(y[0])) for x, y in zip(a, c))
    assert all(x[0].size == (48, 48) and x[0].mode == "RGB" for x in a)


def test_item_streams_do_not_depend_on_order():
    # item i of a stream is the same whether 3 or 6 items are drawn: pools can be rendered in parallel chunks
    short, long = world.sample_captioned(3, seed=9), world.sample_captioned(6, seed=9)
    assert all(np.array_equal(pixels(x[0]), pixels(y[0])) for x, y in zip(short, long))


def test_captions_name_the_attributes():
    for _, text, attrs in world.sample_captioned(20, seed=1):
        assert text == f"a photo of a {attrs.size} {attrs.colour} {attrs.texture} {attrs.shape}"
        assert attrs.texture in world.TEXTURES  # the pretraining world never shows unseen textures
    rng = np.random.default_rng(0)
    attrs = world.Attributes(shape="star", colour="blue", size="small", texture="dotted",
                             background="black", position="left")
    allowed = {"star", "shape", "blue", "small", "dotted", "black", "background", "left"}
    for _ in range(50):
        text = world.random_caption(attrs, rng)
        words = set(text.rstrip(".").split())
        assert {"star", "shape"} & words
        assert not (words & (set(world.SHAPES) | set(world.COLOURS) | set(world.TEXTURES))) - allowed
        assert world.matches(attrs, world.caption_attributes(text))  # what pretraining treats as a positive


def test_caption_attributes_and_matches():
    stated = world.caption_attributes("a photo of a small red shape on a black background at the top.")
    assert stated == {"size": "small", "colour": "red", "background": "black", "position": "top"}
    red = world.Attributes("star", "red", "small", "solid", "black", "top")
    assert world.matches(red, stated)
    assert not world.matches(world.Attributes("star", "blue", "small", "solid", "black", "top"), stated)
    assert world.matches(red, world.caption_attributes("a photo of a shape."))  # states nothing: fits all


def test_colour_is_where_the_shape_is():
    # a large centred solid red square on white: the centre pixel is red, the corner is background
    image = world.render(world.Attributes("square", "red", "large", "solid", "white", "center"), 64,
                         np.random.default_rng(0))
    centre, corner = pixels(image)[32, 32], pixels(image)[1, 1]
    assert centre[0] > 150 and centre[1] < 90 and centre[2] < 90
    assert corner.min() > 200


def test_styles_and_unseen_textures_change_the_image():
    attrs = world.Attributes("circle", "green", "large", "striped", "gray", "center")
    base = pixels(world.render(attrs, 64, np.random.default_rng(0)))
    for style in (world.Style(outline=True), world.Style(noise=0.2), world.Style(colour_cast=(1.0, 0.8, 0.5)),
                  world.Style(blur=1.5)):
        assert np.abs(pixels(world.render(attrs, 64, np.random.default_rng(0), style)) - base).mean() > 2, style
    for texture in world.UNSEEN_TEXTURES:
        shifted = world.Attributes("circle", "green", "large", texture, "gray", "center")
        assert np.abs(pixels(world.render(shifted, 64, np.random.default_rng(0))) - base).mean() > 1, texture


@pytest.mark.parametrize("bad", [dict(shape="blob"), dict(colour="teal"), dict(texture="furry")])
def test_unknown_attribute_values_are_rejected(bad):
    kwargs = dict(shape="circle", colour="red") | bad
    with pytest.raises(ValueError, match=next(iter(bad))):
        world.Attributes(**kwargs)


def test_parse_class():
    assert world.parse_class("red circle") == {"colour": "red", "shape": "circle"}
    assert world.parse_class("wavy") == {"texture": "wavy"}
    with pytest.raises(ValueError, match="not an attribute"):
        world.parse_class("red blob")
    with pytest.raises(ValueError, match="twice"):
        world.parse_class("red blue circle")


def test_write_class_folders(tmp_path):
    classes = ["circle", "red square", "striped star"]
    written = world.write_class_folders(tmp_path, classes, n_per_class=3, seed=5, size=40)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(classes)
    for name in classes:
        files = sorted((tmp_path / name).glob("*.png"))
        assert files == sorted(written[name]) and len(files) == 3
        expected = world.sample_class(name, 3, seed=5, size=40)
        pinned = world.parse_class(name)
        for path, (image, attrs) in zip(files, expected):
            assert np.array_equal(pixels(Image.open(path).convert("RGB")), pixels(image))  # PNG is lossless
            assert all(getattr(attrs, k) == v for k, v in pinned.items())
    with pytest.raises(ValueError, match="duplicates"):
        world.write_class_folders(tmp_path, ["circle", "circle"], 1, seed=0)


def test_shipped_checkpoint_loads_and_knows_the_world():
    """The fp16 checkpoint loads with open_clip's own call and classifies in-domain images zero-shot."""
    import open_clip
    import torch
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    assert WEIGHTS.is_file(), "rmt_core/weights/rmt-world-vit.pt is missing (bench/pretrain_world_clip.py makes it)"
    assert WEIGHTS.stat().st_size < 10_000_000
    state = torch.load(WEIGHTS, map_location="cpu", weights_only=True)
    assert all(t.dtype == torch.float16 for t in state.values())

    open_clip.add_model_config(CONFIGS)
    model = open_clip.create_model("rmt-world-vit", pretrained=str(WEIGHTS)).eval()
    tokenizer = open_clip.get_tokenizer("rmt-world-vit")
    assert tokenizer.context_length == 32
    assert next(model.parameters()).dtype == torch.float32
    cfg = model.visual.preprocess_cfg  # the serving preprocess stays open_clip's standard one
    assert cfg["size"] in (64, (64, 64)) and cfg["resize_mode"] == "shortest"
    assert tuple(cfg["mean"]) == OPENAI_DATASET_MEAN and tuple(cfg["std"]) == OPENAI_DATASET_STD

    samples = world.sample_captioned(64, seed=123_456)
    x = torch.from_numpy(np.stack([np.asarray(s[0]) for s in samples])).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1)) / torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        image = model.encode_image(x, normalize=True)
        for classes, template, attribute in [(list(world.SHAPES), "a photo of a {}.", "shape"),
                                             (list(world.COLOURS), "a photo of a {} shape.", "colour")]:
            text = model.encode_text(tokenizer([template.format(c) for c in classes]), normalize=True)
            predicted = (image @ text.T).argmax(dim=1).tolist()
            accuracy = np.mean([classes[p] == getattr(s[2], attribute) for p, s in zip(predicted, samples)])
            assert accuracy > 0.6, f"zero-shot {attribute} accuracy {accuracy:.2f} (chance {1 / len(classes):.2f})"
