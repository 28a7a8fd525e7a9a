"""The `rmt` command as a new user meets it: the README snippet, help texts, folder layouts, output formats,
file modes, and `rmt eval` without weights."""
from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rmt_core import cli

ROOT = Path(__file__).resolve().parents[2]
TINY_FLAGS = ["--backbone", "rmt-tiny-vit", "--pretrained", "none", "--epochs", "1", "--min-steps", "2",
              "--batch-size", "8", "--holdout", "0", "--quiet"]
COLOURS = {"red": (200, 30, 30), "blue": (30, 30, 200)}


def write_images(folder: Path, n_per_class: int, seed: int, size=(48, 40)) -> None:
    rng = np.random.default_rng(seed)
    for label, rgb in COLOURS.items():
        (folder / label).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            arr = np.clip(np.asarray(rgb) + rng.normal(0, 25, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(folder / label / f"{label}-{i}.png")


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RMT_")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **extra)
    return env


@pytest.fixture(scope="module")
def tuned_split(tmp_path_factory):
    """`rmt tune` on a train/test tree (tiny random backbone) as a user runs it, under umask 022, with its
    output going to pipes (a log file, a CI job), not a terminal."""
    root = tmp_path_factory.mktemp("cli")
    write_images(root / "data" / "train", 6, seed=0)
    write_images(root / "data" / "test", 3, seed=1)
    flags = [f for f in TINY_FLAGS if f != "--quiet"]  # the progress bar must hide itself off a terminal
    old = os.umask(0o022)
    try:
        run = subprocess.run([sys.executable, "-m", "rmt_core.cli", "tune", "data", "--out", "runs/clf", *flags],
                             cwd=root, env=child_env(), capture_output=True, text=True, timeout=300)
    finally:
        os.umask(old)
    assert run.returncode == 0, run.stderr[-3000:]
    (root / "tune.stdout").write_text(run.stdout)
    (root / "tune.stderr").write_text(run.stderr)
    return root


def test_tune_output_off_a_terminal_has_no_progress_bar_escapes(tuned_split):
    stderr = (tuned_split / "tune.stderr").read_text()
    assert "\r" not in stderr and "\x1b[" not in stderr and "it/s" not in stderr and "step/s" not in stderr
    stdout = (tuned_split / "tune.stdout").read_text()
    assert "classifier   runs/clf" in stdout and "test         6 images under data/test: accuracy" in stdout


def test_tune_on_a_train_test_tree_scores_the_test_split(tuned_split, capsys):
    out = tuned_split / "runs" / "clf"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["labels"] == ["blue", "red"]
    report = json.loads((out / "test.json").read_text())
    assert report["n_images"] == 6 and set(report["per_class"]) == {"blue", "red"}
    assert {Path(r["image"]).parent.parent.name for r in report["predictions"]} == {"test"}
    assert 0.0 <= report["accuracy"] <= 1.0


def test_tune_output_has_ordinary_permissions(tuned_split):
    """Everything `rmt tune` leaves (the classifier and any shared base beside it) is 0755/0644 under umask 022."""
    runs = tuned_split / "runs"
    assert (runs / "clf").stat().st_mode & 0o777 == 0o755
    found = list(runs.rglob("*"))
    assert len(found) >= 4
    for path in found:
        assert path.stat().st_mode & 0o777 == (0o755 if path.is_dir() else 0o644), path


def test_export_writes_an_ordinary_file(tuned_split, tmp_path, capsys):
    """`rmt export` materialises a self-contained model.onnx readable by others (0644 under umask 022)."""
    import onnx

    old = os.umask(0o022)
    try:
        assert cli.main(["export", str(tuned_split / "runs" / "clf"), "--onnx", str(tmp_path / "m.onnx")]) == 0
    finally:
        os.umask(old)
    assert (tmp_path / "m.onnx").stat().st_mode & 0o777 == 0o644
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    assert json.loads(meta["labels"]) == ["blue", "red"]
    assert meta["precision"] == "fp32"
    # --int8: the encoder quantized, and the command says what the build's int8 guard decided
    capsys.readouterr()
    assert cli.main(["export", str(tuned_split / "runs" / "clf"), "--onnx", str(tmp_path / "q.onnx"), "--int8"]) == 0
    guard = json.loads((tuned_split / "runs" / "clf" / "manifest.json").read_text())["int8"]
    assert ("guard passed" if guard["allowed"] else "guard did not pass") in capsys.readouterr().out
    model = onnx.load(str(tmp_path / "q.onnx"))
    assert {p.key: p.value for p in model.metadata_props}["precision"] == "int8"
    assert any(n.op_type == "DynamicQuantizeLinear" for n in model.graph.node)


def test_tune_split_tree_needs_test_classes_from_train(tmp_path):
    write_images(tmp_path / "train", 2, seed=0)
    write_images(tmp_path / "test", 1, seed=1)
    (tmp_path / "test" / "green").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "test" / "green" / "g.png")
    from rmt_core.pipeline import samples_from_folders

    with pytest.raises(ValueError, match="green"):
        cli.tune_samples(tmp_path, samples_from_folders)
    train, test, test_dir = cli.tune_samples(tmp_path / "train", samples_from_folders)  # plain class folders
    assert test is None and {label for _, label in train} == {"blue", "red"}


def test_tune_help_explains_dir_and_out(capsys):
    with pytest.raises(SystemExit):
        cli.main(["tune", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "DIR/<label>/<image>" in text and "DIR/train/<label>" in text and "DIR/test/<label>" in text
    assert re.search(r"--out OUT Classifier folder to write", text)


def test_predict_accepts_a_folder_and_three_formats(tuned_split, capsys):
    out, images = tuned_split / "runs" / "clf", tuned_split / "data" / "test" / "red"
    names = sorted(p.name for p in images.iterdir())

    assert cli.main(["predict", str(out), str(images), "--top-k", "2", "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [Path(r["image"]).name for r in rows] == [n for n in names for _ in range(2)]
    assert [r["rank"] for r in rows[:2]] == ["1", "2"] and {r["label"] for r in rows} == {"blue", "red"}

    assert cli.main(["predict", str(out), str(images), str(tuned_split / "data/test/blue/blue-0.png"),
                     "--format", "jsonl"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [Path(x["image"]).name for x in lines] == names + ["blue-0.png"]
    assert all(abs(sum(p["score"] for p in x["predictions"]) - 1) < 1e-4 for x in lines)

    assert cli.main(["predict", str(out), str(images), "--top-k", "1"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert len(table) == len(names) and all(re.match(r".*red-\d\.png: (red|blue) \d\.\d{3}$", t) for t in table)

    assert cli.main(["predict", str(out), str(tuned_split / "runs")]) == 2  # a folder with no images
    assert "holds no images" in capsys.readouterr().err


def test_readme_library_snippet_runs(tmp_path):
    """The README's library snippet, run as written in a fresh interpreter (tiny backbone swapped in for speed)."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### Library use"):]
    snippet = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    fast = 'backbone="rmt-tiny-vit", pretrained=None, epochs=1, min_steps=2, batch_size=8, '
    assert snippet.count("TuneConfig(method=") == 1
    snippet = snippet.replace('TuneConfig(method=', f'TuneConfig({fast}method=')
    write_images(tmp_path / "my_images", 4, seed=0)
    Image.new("RGB", (50, 40), (200, 30, 30)).save(tmp_path / "x.jpg")
    lines = snippet.rstrip().splitlines()
    lines[-1] = f"print('RESULT', {lines[-1].strip()})"  # show the last expression, as a notebook would
    (tmp_path / "snippet.py").write_text("\n".join(lines) + "\n")
    run = subprocess.run([sys.executable, "snippet.py"], cwd=tmp_path, env=child_env(), capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = run.stdout.split("RESULT", 1)[1]
    assert "'label'" in result and ("red" in result or "blue" in result)


def test_eval_without_local_weights_fails_at_once_in_one_sentence(tmp_path):
    """The paper's default (ViT-B-16, openai) with an empty hub cache: no download (the proxy is a closed port,
    so an attempt would fail differently), no traceback, a way out."""
    run = subprocess.run([sys.executable, "-m", "rmt_core.cli", "eval", "--root", str(tmp_path / "data"),
                          "--datasets", "OxfordPets", "--shots", "1", "--seeds", "1", "--out", str(tmp_path / "out")],
                         cwd=tmp_path, env=child_env(HF_HOME=str(tmp_path / "hf"), HTTPS_PROXY="http://127.0.0.1:9",
                                                     HTTP_PROXY="http://127.0.0.1:9"),
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr
    err = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and "Traceback" not in run.stderr, run.stderr
    assert err[0].startswith("rmt eval: error: ") and "--pretrained" in err[0] and "never downloads" in err[0]
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "hf").exists() or not any((tmp_path / "hf").rglob("*.bin"))


def test_cached_tag_weights_are_accepted_offline(tmp_path):
    """A tag whose weights are in the local hub cache loads from there; an unknown tag is a clear ValueError."""
    snapshot = tmp_path / "hf" / "hub" / "models--timm--vit_base_patch16_clip_224.openai" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "open_clip_model.safetensors").write_bytes(b"not really weights")
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    code = ("from rmt_core.backbones import require_cached_weights as r\n"
            "r('ViT-B-16', 'openai'); print('cached ok')\n"
            "try:\n    r('ViT-B-16', 'no-such-tag')\nexcept ValueError as e:\n    print('ValueError', e)\n"
            "try:\n    r('ViT-B-32', 'openai')\nexcept FileNotFoundError as e:\n    print('missing', e)\n")
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=child_env(HF_HOME=str(tmp_path / "hf")),
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "cached ok" in run.stdout
    assert "ValueError pretrained='no-such-tag'" in run.stdout and "openai" in run.stdout.split("ValueError")[1]
    assert "missing the ViT-B-32 weights 'openai' are not on this machine" in run.stdout


def test_eval_off_a_terminal_writes_result_lines_not_progress_bars(tmp_path, capsys):
    """`rmt eval` without --quiet, its output going to a log: one line per run, no \\r-redrawn tqdm bars."""
    from rmt_core.evaluation import main as eval_main

    write_images(tmp_path / "data" / "toy" / "train", 3, seed=0)
    write_images(tmp_path / "data" / "toy" / "test", 2, seed=1)
    assert eval_main(["--root", str(tmp_path / "data"), "--datasets", "toy", "--shots", "1", "--seeds", "1",
                      "--backbone", "rmt-tiny-vit", "--pretrained", "none", "--epochs", "1", "--min-steps", "2",
                      "--workers", "0", "--out", str(tmp_path / "out")]) == 0
    captured = capsys.readouterr()
    for stream in (captured.out, captured.err):
        assert "\r" not in stream and "\x1b[" not in stream and "it/s" not in stream
    assert "toy K=1 seed=1 r-amt:" in captured.out + captured.err
