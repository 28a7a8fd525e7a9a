import io

import pytest
from PIL import Image

from rmt_core.config import TuneConfig
from rmt_core.images import InvalidImage, open_image
from rmt_core.templates import COOP_TEMPLATES, class_prompt


def test_defaults_follow_the_official_recipe():
    c = TuneConfig()
    assert (c.mask_init, c.threshold, c.learning_rate, c.epochs, c.batch_size, c.leak, c.l2_weight) == \
        (1e-2, 5e-3, 8e-5, 30, 32, 1.0, 1e-4)
    assert c.method == "r-amt" and c.uses_gdr and c.target == "amt" and c.mask_conv1
    assert not TuneConfig(method="amt").uses_gdr


@pytest.mark.parametrize("values, field", [
    ({"method": "lora"}, "method"), ({"leak": 1.5}, "leak"), ({"epochs": 0}, "epochs"),
    ({"epochs": "3"}, "epochs"), ({"learning_rate": -1}, "learning_rate"), ({"batch_size": True}, "batch_size"),
    ({"prompt_template": "a photo"}, "prompt_template"), ({"holdout": 1.0}, "holdout"),
    ({"threshold": 0.02}, "mask_init"), ({"colour": 1}, "colour"),
])
def test_bad_values_name_the_field(values, field):
    with pytest.raises(ValueError, match=field):
        TuneConfig.from_dict(values)


def test_from_dict_round_trips():
    c = TuneConfig.from_dict({"method": "R-PMT", "epochs": 3, "learning_rate": 1, "pretrained": None})
    assert c.method == "r-pmt" and c.learning_rate == 1.0 and c.pretrained is None
    assert TuneConfig.from_dict(c.to_dict()) == c


def test_templates():
    assert len(COOP_TEMPLATES) == 11
    assert class_prompt("sea_lion", COOP_TEMPLATES["OxfordPets"]) == "a photo of a sea lion, a type of pet."
    assert class_prompt("banded", COOP_TEMPLATES["DTD"]) == "banded texture."


def _png(w, h, mode="RGB"):
    buf = io.BytesIO()
    Image.new(mode, (w, h)).save(buf, "PNG")
    return buf.getvalue()


def test_open_image_decodes_and_converts():
    assert open_image(_png(10, 8, "LA")).mode == "RGB"
    assert open_image(_png(10, 8, "P")).size == (10, 8)


@pytest.mark.parametrize("data, code", [
    (b"", "empty"), (b"hello world", "not_an_image"), (_png(64, 64)[:60], "corrupt"),
    (_png(3000, 3000), "too_many_pixels"),
])
def test_open_image_refuses_bad_input(data, code):
    with pytest.raises(InvalidImage) as err:
        open_image(data, max_pixels=1_000_000)
    assert err.value.code == code
