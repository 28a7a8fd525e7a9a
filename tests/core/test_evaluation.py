"""`rmt eval` (the CoOp few-shot protocol) on a tiny generated dataset laid out as CoOp's and as image folders."""
import csv
import json
import random
from collections import Counter, defaultdict

import numpy as np
import pytest
import torch
from PIL import Image

from rmt_core import evaluation
from rmt_core.backbones import encode_class_texts, load_backbone
from rmt_core.evaluation import Item, load_dataset, main, paper_comparison, sample_few_shot, summarize
from rmt_core.preprocess import PreprocessConfig, preprocess_batch
from rmt_core.tuning import class_logits

COLOURS = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)}
TRAIN_PER_CLASS = {"red": 5, "green": 5, "blue": 1}  # blue has fewer than K=2: drawn with replacement
TEST_PER_CLASS = 3
BASE = ["--backbone", "rmt-tiny-vit", "--pretrained", "none", "--seeds", "1", "2", "--epochs", "1",
        "--min-steps", "3", "--lr", "1e-3", "--workers", "0", "--quiet"]
FAST = [*BASE, "--shots", "1", "2"]


def _image(rgb, rng) -> Image.Image:
    arr = np.clip(np.asarray(rgb) + rng.normal(0, 25, (40, 48, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


def _write_split_zhou(root, folder="oxford_pets", image_dir="images", split_name="split_zhou_OxfordPets.json"):
    """A CoOp dataset folder: <folder>/<image_dir>/<class>/*.png + <folder>/split_zhou_<Name>.json."""
    rng = np.random.default_rng(0)
    split = {"train": [], "val": [], "test": []}
    for label, (name, rgb) in enumerate(COLOURS.items()):
        counts = {"train": TRAIN_PER_CLASS[name], "val": 1, "test": TEST_PER_CLASS}
        for part, n in counts.items():
            for i in range(n):
                rel = f"{name}/{part}_{i}.png"
                path = root / folder / image_dir / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                _image(rgb, rng).save(path)
                split[part].append([rel, label, f"{name}_colour"])
    (root / folder / split_name).write_text(json.dumps(split))
    return root / folder / split_name


def _write_image_folders(root, name="colours"):
    rng = np.random.default_rng(1)
    for colour, rgb in COLOURS.items():
        for part, n in (("train", TRAIN_PER_CLASS[colour]), ("test", TEST_PER_CLASS)):
            (root / name / part / colour).mkdir(parents=True)
            for i in range(n):
                _image(rgb, rng).save(root / name / part / colour / f"{i}.png")


def _dassl_generate_fewshot(items, num_shots, seed):
    """CoOp's draw, written as Dassl writes it: global random after set_random_seed, repeat=True."""
    random.seed(seed)
    tracker = defaultdict(list)
    for item in items:
        tracker[item.label].append(item)
    out = []
    for group in tracker.values():
        out += random.sample(group, num_shots) if len(group) >= num_shots else random.choices(group, k=num_shots)
    return out


def test_few_shot_draw_is_coops_deterministic_and_exactly_k_per_class():
    items = [Item(f"{c}{i}.jpg", c, str(c)) for i in range(20) for c in range(4)]  # interleaved classes
    items += [Item("rare.jpg", 4, "4")]  # a class with a single image
    for k in (1, 2, 4, 8, 16):
        for seed in (1, 2, 3):
            drawn = sample_few_shot(items, k, seed)
            assert drawn == sample_few_shot(items, k, seed)
            assert drawn == _dassl_generate_fewshot(items, k, seed)
            assert Counter(it.label for it in drawn) == {c: k for c in range(5)}
            normal = [it for it in drawn if it.label < 4]
            assert len(set(normal)) == len(normal), "without replacement where a class has >= K images"
        assert sample_few_shot(items, k, 1) != sample_few_shot(items, k, 2)
    with pytest.raises(ValueError, match="shots"):
        sample_few_shot(items, 0, 1)


def test_loader_finds_coop_layout_and_rejects_broken_splits(tmp_path, capsys):
    split_path = _write_split_zhou(tmp_path)
    ds = load_dataset(tmp_path, "oxfordpets")
    assert (ds.name, ds.layout, ds.template) == ("OxfordPets", "split_zhou", "a photo of a {}, a type of pet.")
    assert ds.classnames == ["red_colour", "green_colour", "blue_colour"]
    assert len(ds.train) == 11 and len(ds.test) == 9 and all(it.path.is_file() for it in ds.test)
    assert len(load_dataset(tmp_path, "OxfordPets", limit_test=4).test) == 4

    split = json.loads(split_path.read_text())
    split["test"].append(["red/test_0.png", 7, "violet"])
    split_path.write_text(json.dumps(split))
    with pytest.raises(ValueError, match="class id 7"):
        load_dataset(tmp_path, "OxfordPets")
    split["test"][-1] = ["red/missing.png", 0, "red_colour"]
    split_path.write_text(json.dumps(split))
    with pytest.raises(FileNotFoundError, match="1 of the listed images are missing.*--image-dir"):
        load_dataset(tmp_path, "OxfordPets")
    split["test"].pop()
    split["train"] = [["red/gone.png", 0, "red_colour"]] + split["train"]  # K=6 draws all 6 red ones
    split_path.write_text(json.dumps(split))
    assert main(["--root", str(tmp_path), "--datasets", "OxfordPets", "--out", str(tmp_path / "o"), *BASE,
                 "--shots", "6"]) == 2
    assert "gone.png" in capsys.readouterr().err
    split_path.unlink()
    with pytest.raises(FileNotFoundError, match="split_zhou_OxfordPets.json"):
        load_dataset(tmp_path, "OxfordPets")
    with pytest.raises(FileNotFoundError, match="dtd"):
        load_dataset(tmp_path, "DTD")


def test_loader_reads_coops_fgvc_aircraft_and_imagenet_layouts(tmp_path):
    fgvc = tmp_path / "fgvc_aircraft"
    (fgvc / "images").mkdir(parents=True)
    (fgvc / "variants.txt").write_text("707-320\nA300B4\n")
    (fgvc / "images_variant_train.txt").write_text("0001 A300B4\n0002 707-320\n")
    (fgvc / "images_variant_test.txt").write_text("0003 707-320\n")
    for i in (1, 2, 3):
        _image((9, 9, 9), np.random.default_rng(i)).save(fgvc / "images" / f"000{i}.jpg")
    ds = load_dataset(tmp_path, "FGVCAircraft")
    assert ds.layout == "fgvc_variants" and ds.classnames == ["707-320", "A300B4"]
    assert [(it.path.name, it.label) for it in ds.train] == [("0001.jpg", 1), ("0002.jpg", 0)]
    assert ds.template == "a photo of a {}, a type of aircraft."

    imagenet = tmp_path / "imagenet"
    for part, folders in (("train", ("n02", "n01")), ("val", ("n01",))):
        for folder in folders:
            (imagenet / "images" / part / folder).mkdir(parents=True)
            _image((9, 9, 9), np.random.default_rng(0)).save(imagenet / "images" / part / folder / "a.png")
    (imagenet / "classnames.txt").write_text("n01 tench\nn02 goldfish fish\n")
    ds = load_dataset(tmp_path, "ImageNet")
    assert ds.layout == "image_folders" and ds.classnames == ["tench", "goldfish fish"]
    assert [it.label for it in ds.test] == [0]
    (imagenet / "images" / "val" / "n03").mkdir()
    with pytest.raises(ValueError, match="n03 is a class the train split does not have"):
        load_dataset(tmp_path, "ImageNet")


def test_rmt_eval_on_coop_layout_reports_mean_std_zero_shot_and_files(tmp_path, capsys):
    _write_split_zhou(tmp_path / "data")
    out = tmp_path / "out"
    assert main(["--root", str(tmp_path / "data"), "--datasets", "OxfordPets", "--out", str(out), *FAST]) == 0
    printed = capsys.readouterr().out

    report = json.loads((out / "results.json").read_text())
    assert set(report["zero_shot"]) == {"OxfordPets"} and 0 <= report["zero_shot"]["OxfordPets"] <= 100
    runs = report["runs"]
    assert sorted((r["shots"], r["seed"]) for r in runs) == [(1, 1), (1, 2), (2, 1), (2, 2)]
    assert all(r["method"] == "r-amt" and r["n_test"] == 9 and r["n_train"] == 3 * r["shots"] for r in runs)
    assert any("with replacement" in w for r in runs if r["shots"] == 2 for w in r["warnings"])

    rows = {(r["shots"], r["method"]): r for r in report["summary"]}
    assert set(rows) == {(0, "zero-shot"), (1, "r-amt"), (2, "r-amt")}
    for k in (1, 2):
        accs = [r["accuracy"] for r in runs if r["shots"] == k]
        assert rows[(k, "r-amt")]["n_seeds"] == 2
        assert rows[(k, "r-amt")]["accuracy_mean"] == pytest.approx(np.mean(accs))
        assert rows[(k, "r-amt")]["accuracy_std"] == pytest.approx(np.std(accs))
        assert rows[(k, "r-amt")]["sparsity_mean"] == pytest.approx(np.mean([r["sparsity"] for r in runs
                                                                             if r["shots"] == k]))

    # zero-shot recomputed independently: open_clip-equivalent preprocessing, the CoOp template, every test image
    ds = load_dataset(tmp_path / "data", "OxfordPets")
    backbone = load_backbone("rmt-tiny-vit", None, seed=0)
    x = torch.from_numpy(preprocess_batch([Image.open(it.path).convert("RGB") for it in ds.test],
                                          PreprocessConfig.from_dict(backbone.preprocess)))
    text = encode_class_texts(backbone, ds.classnames, "a photo of a {}, a type of pet.")
    with torch.no_grad():
        pred = class_logits(backbone.model, x, text).argmax(1).numpy()
    expected = 100 * float(np.mean(pred == np.array([it.label for it in ds.test])))
    assert report["zero_shot"]["OxfordPets"] == pytest.approx(expected)

    shots = json.loads((out / "shots.json").read_text())["OxfordPets"]
    for k in ("1", "2"):
        for seed in ("1", "2"):
            per_class = Counter(path.split("/")[1] for path in shots[k][seed])
            assert per_class == {c: int(k) for c in COLOURS}
    assert shots["1"]["1"] != shots["1"]["2"]

    md = (out / "results.md").read_text()
    assert "| OxfordPets | 1 | r-amt |" in md and " ± " in md and "zero-shot" in md and md.strip() in printed
    with (out / "results.csv").open() as fh:
        table = list(csv.DictReader(fh))
    assert [(r["shots"], r["method"]) for r in table] == [("0", "zero-shot"), ("1", "r-amt"), ("2", "r-amt")]
    assert "PAPER" not in printed  # the paper's numbers only appear next to its own backbone
    assert len((out / "runs.jsonl").read_text().splitlines()) == 5

    def no_tuning(*args, **kwargs):
        raise AssertionError("--resume must not tune again")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("rmt_core.tuning.tune", no_tuning)
        assert main(["--root", str(tmp_path / "data"), "--datasets", "OxfordPets", "--out", str(out), "--resume",
                     *FAST]) == 0
    assert json.loads((out / "results.json").read_text())["summary"] == report["summary"]


def test_rmt_eval_on_image_folders_with_template_and_average(tmp_path, capsys):
    _write_image_folders(tmp_path)
    _write_split_zhou(tmp_path, folder="dtd", split_name="split_zhou_DescribableTextures.json")
    out = tmp_path / "out"
    assert main(["--root", str(tmp_path), "--datasets", "colours,DTD", "--template", "a {} square.",
                 "--methods", "r-amt", "amt", "--shots", "1", "--out", str(out), *BASE]) == 0
    report = json.loads((out / "results.json").read_text())
    assert report["datasets"]["colours"]["layout"] == "image_folders"
    assert report["datasets"]["colours"]["template"] == report["datasets"]["DTD"]["template"] == "a {} square."
    rows = {(r["dataset"], r["shots"], r["method"]) for r in report["summary"]}
    assert rows == {(d, 0, "zero-shot") for d in ("colours", "DTD", "Average")} | {
        (d, 1, m) for d in ("colours", "DTD", "Average") for m in ("r-amt", "amt")}
    avg = next(r for r in report["summary"] if r["dataset"] == "Average" and r["method"] == "amt")
    per = [r["accuracy_mean"] for r in report["summary"] if r["dataset"] != "Average" and r["method"] == "amt"]
    assert avg["accuracy_mean"] == pytest.approx(np.mean(per)) and avg["accuracy_std"] is not None


def test_missing_dataset_is_a_clear_error(tmp_path, capsys):
    assert main(["--root", str(tmp_path), "--datasets", "EuroSAT", "--out", str(tmp_path / "o"), *FAST]) == 2
    assert "eurosat" in capsys.readouterr().err


def test_paper_reference_is_labelled_and_uses_table3():
    runs = [{"dataset": "DTD", "shots": 16, "seed": s, "method": "r-amt", "accuracy": a, "sparsity": 2.0}
            for s, a in ((1, 70.0), (2, 72.0), (3, 74.0))]
    text = paper_comparison(summarize(runs, {"DTD": 44.0}))
    assert text.startswith("PAPER'S NUMBERS, NOT OURS")
    assert "| DTD | 44.39 | 74.57 | 44.00 | 72.00 ± 1.63 |" in text
    assert "65.23 | 83.96" in text and "1 of the paper's 11" in text
    zs, ramt = zip(*evaluation.PAPER_TABLE3.values())
    assert (round(np.mean(zs), 2), round(np.mean(ramt), 2)) == (65.23, 83.96)


def test_paper_protocol_uses_the_official_gdr_leak_per_dataset_and_shots():
    from rmt_core.evaluation import official_leak, parse_args, run_config

    assert official_leak("OxfordPets", 16) == 0.3 and official_leak("dtd", 16) == 0.3
    assert official_leak("ImageNet", 16) == official_leak("SUN397", 16) == official_leak("food-101", 16) == 1.0
    assert official_leak("OxfordPets", 8) == 1.0
    args = parse_args(["--datasets", "OxfordPets"])
    assert run_config("r-amt", 37, 1, "a photo of a {}.", args, "OxfordPets", 16).leak == 0.3
    assert run_config("r-amt", 1000, 1, "a photo of a {}.", args, "ImageNet", 16).leak == 1.0
    forced = parse_args(["--datasets", "OxfordPets", "--leak", "0.5"])
    assert run_config("r-amt", 37, 1, "a photo of a {}.", forced, "OxfordPets", 16).leak == 0.5
