import io

import pytest
from PIL import Image

from rmt_core.config import TuneConfig
from rmt_core.images import InvalidImage, open_image
from rmt_core.templates import COOP_TEMPLATES, class_prompt


def test_the_paper_recipe_follows_the_official_recipe():
    c = TuneConfig()
    assert (c.mask_init, c.threshold, c.learning_rate, c.epochs, c.batch_size, c.leak, c.l2_weight) == \
        (1e-2, 5e-3, 8e-5, 30, 32, 1.0, 1e-4)
    assert (c.min_steps, c.warmup_steps) == (300, 0)
    official = TuneConfig(recipe="fast").paper_recipe()  # back to the paper: lr, no floor, no warm-up
    assert (official.recipe, official.learning_rate, official.min_steps, official.warmup_steps) == ("paper", 8e-5, 0, 0)
    assert TuneConfig(learning_rate=3e-5).paper_recipe().learning_rate == 3e-5  # a set lr is kept


def test_recipes_fill_only_unset_values_and_round_trip():
    fast = TuneConfig(recipe="fast")
    assert fast.learning_rate > 8e-5 and fast.min_steps < 300 and fast.warmup_steps > 0
    mine = TuneConfig.from_dict({"recipe": "fast", "learning_rate": 1e-4, "min_steps": None})
    assert mine.learning_rate == 1e-4 and mine.min_steps == fast.min_steps
    assert TuneConfig.from_dict(mine.to_dict()) == mine
    with pytest.raises(ValueError, match="recipe"):
        TuneConfig(recipe="fastest")
    with pytest.raises(ValueError, match="warmup_steps"):
        TuneConfig.from_dict({"warmup_steps": "5"})
    with pytest.raises(ValueError, match="precision"):
        TuneConfig(precision="fp16")
    plan = fast.schedule(30)
    assert (plan["recipe"], plan["learning_rate"], plan["warmup_steps"]) == ("fast", fast.learning_rate, fast.warmup_steps)
    assert fast.method == "r-amt" and fast.uses_gdr and fast.target == "amt" and fast.mask_conv1
    assert not TuneConfig(method="amt").uses_gdr


@pytest.mark.parametrize("values, field", [
    ({"method": "lora"}, "method"), ({"leak": 1.5}, "leak"), ({"epochs": 0}, "epochs"),
    ({"epochs": "3"}, "epochs"), ({"learning_rate": -1}, "learning_rate"), ({"batch_size": True}, "batch_size"),
    ({"prompt_template": "a photo"}, "prompt_template"), ({"holdout": 1.0}, "holdout"),
    ({"threshold": 0.02}, "mask_init"), ({"colour": 1}, "colour"), ({"threshold": -0.5}, "threshold"),
    ({"mask_init": 0.0, "threshold": 0.0}, "mask_init"),
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


@pytest.mark.parametrize("values, field", [
    ({"learning_rate": float("nan")}, "learning_rate"), ({"leak": float("inf")}, "leak"),
    ({"l2_weight": -float("inf")}, "l2_weight"), ({"kl_temperature": 0}, "kl_temperature"),
    ({"epochs": 10**9}, "epochs"), ({"min_steps": 10**9}, "min_steps"), ({"batch_size": 10**6}, "batch_size"),
    ({"seed": -1}, "seed"), ({"seed": 2**40}, "seed"), ({"holdout": 0.95}, "holdout"), ({"holdout": -0.1}, "holdout"),
    ({"parity_atol": 0.0}, "parity_atol"), ({"parity_atol": 5.0}, "parity_atol"),
    ({"prompt_template": "{} and {}"}, "prompt_template"), ({"prompt_template": "a {0.__class__} {}"}, "prompt_template"),
    ({"prompt_template": "a photo of a {}" + "!" * 300}, "prompt_template"),
    ({"prompt_template": "a {}\x00"}, "prompt_template"), ({"backbone": ""}, "backbone"),
])
def test_unbounded_or_non_finite_values_are_refused(values, field):
    with pytest.raises(ValueError, match=field):
        TuneConfig.from_dict(values)


def test_schedule_reports_the_total_steps_a_service_caps():
    plan = TuneConfig(epochs=1000, min_steps=0, batch_size=1).schedule(2000)
    assert plan["total_steps"] == 2_000_000  # each bound alone is fine; their product is what a service caps


def _png16(values):
    buf = io.BytesIO()
    Image.fromarray(values.astype("uint16")).save(buf, "PNG")
    return buf.getvalue()


def test_a_16_bit_png_is_scaled_to_8_bit_not_clipped():
    import numpy as np

    ramp = np.tile(np.linspace(0, 65535, 64), (8, 1))
    img = open_image(_png16(ramp))
    pixels = np.asarray(img)[..., 0].astype(int)
    assert img.mode == "RGB"
    assert pixels[0, 0] == 0 and pixels[0, -1] == 255
    assert abs(pixels[0, 32] - 255 * 32 / 63) <= 1  # mid-grey stays mid-grey (Pillow's convert made it 255)
    dark = open_image(_png16(np.full((4, 4), 200)))  # a dark 16-bit image stays dark
    assert np.asarray(dark).max() <= 1


def test_an_exif_rotated_jpeg_is_decoded_upright():
    import numpy as np

    stored = Image.new("RGB", (40, 20), (255, 0, 0))
    stored.paste((0, 0, 255), (0, 0, 20, 20))  # left half blue, right half red, as stored (landscape)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    buf = io.BytesIO()
    stored.save(buf, "JPEG", exif=exif.tobytes(), quality=95)
    img = open_image(buf.getvalue())
    assert img.size == (20, 40)  # portrait, as a phone shows it
    top, bottom = np.asarray(img)[5, 10], np.asarray(img)[35, 10]
    assert top[2] > 200 and top[0] < 60, top  # the stored left (blue) side is on top after rotating clockwise
    assert bottom[0] > 200 and bottom[2] < 60, bottom
