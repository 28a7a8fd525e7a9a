"""The library's commands: tune, predict, export, info, sample, eval (`python -m rmt_core.cli ...`).

The umbrella `rmt` command (rmt_cli) adds serve, worker, migrate and remote on top of these; the library itself
knows nothing of the service. Only the subcommand that runs imports its heavy modules: `rmt predict` never
imports torch.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from .config import METHODS, TuneConfig
from .images import IMAGE_SUFFIXES

# Commands with a parser of their own: the CLI only forwards argv to module.main.
DISPATCH = {
    "eval": ("rmt_core.evaluation", "CoOp few-shot protocol: K shots x seeds, accuracy table."),
}

_TUNE_FLAGS = {
    # flag: (TuneConfig field, type)
    "--method": ("method", str), "--backbone": ("backbone", str), "--pretrained": ("pretrained", str),
    "--epochs": ("epochs", int), "--min-steps": ("min_steps", int), "--lr": ("learning_rate", float),
    "--batch-size": ("batch_size", int), "--threshold": ("threshold", float), "--leak": ("leak", float),
    "--template": ("prompt_template", str), "--seed": ("seed", int), "--holdout": ("holdout", float),
}


def fail(message: str, code: int = 2) -> int:
    print(f"rmt: error: {message}", file=sys.stderr)
    return code


def cmd_tune(args) -> int:
    from tqdm import tqdm

    from .pipeline import build_classifier, samples_from_folders

    values = json.loads(Path(args.config).read_text()) if args.config else {}
    for flag, (name, _) in _TUNE_FLAGS.items():
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None:
            values[name] = None if (name == "pretrained" and value == "none") else value
    config = TuneConfig.from_dict(values)
    out = Path(args.out)
    if out.exists() and not args.force:
        return fail(f"{out} exists; pass --force to replace it")
    samples, test_samples, test_dir = tune_samples(Path(args.data), samples_from_folders)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    # disable=None: a bar on a terminal, nothing in a log file (tqdm would write every update there)
    bar = tqdm(total=None, unit="step", disable=True if args.quiet else None, dynamic_ncols=True, mininterval=0.5)

    def report(p):
        bar.total = p.total_steps
        # the bar counts steps against the planned total; epochs (raised to reach min_steps) would mislead
        bar.set_postfix(loss=f"{p.loss:.3f}", acc=f"{p.train_accuracy:.2f}", sparsity=f"{p.sparsity:.2f}%",
                        **({"eta": f"{p.eta_seconds:.0f}s"} if p.eta_seconds is not None else {}))
        if p.stop_reason:
            bar.write(f"stopped early at step {p.step}/{p.total_steps}: {p.stop_reason}")
        bar.update(p.step - bar.n)

    try:
        manifest = build_classifier(samples, config, tmp, progress=report, device=args.device)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        bar.close()
    normal_permissions(tmp)
    if (out.parent / "bases").is_dir():  # the shared encoder build_classifier keeps beside its output
        normal_permissions(out.parent / "bases")
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
    _print_info(manifest, out)
    if test_samples:
        report = score_test_set(out, test_samples, providers=args.providers)
        (out / "test.json").write_text(json.dumps(report, indent=2) + "\n")
        print(f"test         {report['n_images']} images under {test_dir}: accuracy {report['accuracy']:.1%} "
              f"(per class in {out / 'test.json'})")
    return 0


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def normal_permissions(root: Path) -> None:
    """Folders 0777 and files 0666, less the umask (0755/0644 usually): mkdtemp and atomic writes through
    mkstemp make 0700/0600, which would leave a classifier that only its creator can read."""
    mask = _current_umask()
    os.chmod(root, 0o777 & ~mask)
    for path in root.rglob("*"):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


SPLIT_NAMES = {"train": ("train",), "test": ("test", "val", "valid", "validation")}


def tune_samples(data: Path, from_folders) -> tuple[list, list | None, Path | None]:
    """(training samples, test samples or None, test folder) from DIR.

    DIR is either one folder per class, or a split tree: DIR/train/<class>/... is tuned on, and
    DIR/test/<class>/... (or val/) is scored afterwards with the finished classifier.
    """
    train_dir = data / "train"
    if not (train_dir.is_dir() and any(p.is_dir() and not p.name.startswith(".") for p in train_dir.iterdir())):
        return from_folders(data), None, None
    train = from_folders(train_dir)
    test_dir = next((data / n for n in SPLIT_NAMES["test"] if (data / n).is_dir()), None)
    if test_dir is None:
        return train, None, None
    test = from_folders(test_dir)
    unknown = sorted({label for _, label in test} - {label for _, label in train})
    if unknown:
        raise ValueError(f"{test_dir} has classes that {train_dir} lacks: {', '.join(unknown)}")
    return train, test, test_dir


def score_test_set(model_dir: Path, samples: list, providers: str = "auto") -> dict:
    """Accuracy of the finished classifier on held-out test images, overall and per class."""
    from .images import open_image_file

    clf = open_classifier(model_dir, providers)
    correct: dict[str, list[int]] = {}
    rows = []
    for start in range(0, len(samples), 32):
        batch = samples[start:start + 32]
        for (path, label), preds in zip(batch, clf.classify([open_image_file(p) for p, _ in batch], top_k=1)):
            hit = preds[0]["label"] == label
            correct.setdefault(label, []).append(int(hit))
            rows.append({"image": str(path), "label": label, "predicted": preds[0]["label"],
                         "score": round(preds[0]["score"], 6)})
    total = sum(sum(v) for v in correct.values())
    return {"n_images": len(samples), "accuracy": total / len(samples),
            "per_class": {label: sum(v) / len(v) for label, v in sorted(correct.items())}, "predictions": rows}


def open_classifier(model_dir: Path | str, providers: str = "auto"):
    """The published classifier in ``model_dir``, for ONNX Runtime (no torch); its base is found beside it."""
    from .runtime import default_bases_dir, load_classifier

    return load_classifier(model_dir, default_bases_dir(model_dir), providers=providers)


def _print_info(manifest: dict, path: Path) -> None:
    print(f"classifier   {path}")
    print(f"labels       {', '.join(manifest['labels'])}")
    print(f"backbone     {manifest['backbone']} ({manifest['pretrained']}), method {manifest['method']}")
    tuning = manifest.get("tuning") or {}
    planned = f" of {tuning['planned_steps']} planned ({tuning['stop_reason']})" if tuning.get("planned_steps") else ""
    print(f"steps        {manifest['steps']}{planned}, {manifest.get('elapsed_s', '?')} s"
          + (f", {tuning['precision']}" if tuning.get("precision") else ""))
    print(f"sparsity     {manifest['sparsity']:.3f}% of {manifest['mask_entries']} mask entries masked out")
    print(f"mask file    {manifest['mask_bytes']} B (entropy bound {manifest['mask_entropy_bound_bytes']} B), "
          + (f"model.onnx {manifest['onnx_bytes'] / 1e6:.1f} MB" if "onnx_bytes" in manifest
             else f"head {manifest.get('head_bytes', 0) / 1e3:.1f} kB on shared base {manifest.get('base_id')}")
          + f", parity {manifest['parity_max_abs_diff']:.2g}")
    guard = manifest.get("int8")
    if isinstance(guard, dict) and guard.get("agreement") is not None:
        print(f"int8         {'allowed' if guard.get('allowed') else 'not allowed'}: argmax agreement "
              f"{guard['agreement']:.3f}, accuracy {guard['accuracy_fp32']:.3f} fp32 / {guard['accuracy_int8']:.3f} "
              f"int8 on {guard['n']} images")
    elif isinstance(guard, dict) and guard.get("reason"):
        print(f"int8         not allowed: {guard['reason']}")
    val = manifest.get("validation")
    if val and val.get("tuned_accuracy") is not None:
        print(f"validation   {val['n_holdout']} held-out images: zero-shot {val['zero_shot_accuracy']:.1%} -> "
              f"tuned {val['tuned_accuracy']:.1%}")
    if val and val.get("published"):
        acc = val.get("published_accuracy")
        by = val.get("validated_by") or {}
        print(f"published    {val['published']}" + (f" {acc:.1%} ({by.get('method')}, n={by.get('n')})" if acc is not None
                                                   else " (not validated)") + f": {val.get('why', '')}")
    for warning in manifest.get("warnings", []):
        print(f"warning      {warning}")


def cmd_info(args) -> int:
    path = Path(args.classifier)
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except FileNotFoundError:
        return fail(f"{path} is not a classifier directory (no manifest.json)")
    if args.json:
        print(json.dumps(manifest, indent=2))
    else:
        _print_info(manifest, path)
    return 0


def cmd_predict(args) -> int:
    from .images import InvalidImage, open_image_file

    try:
        paths = expand_image_args(args.images)
    except ValueError as exc:
        return fail(str(exc))
    clf = open_classifier(args.classifier, providers=args.providers)
    fmt = "jsonl" if args.json else args.format
    writer = PredictionWriter(fmt, sys.stdout)
    for start in range(0, len(paths), 32):  # a folder of thousands: bounded memory, output as it goes
        batch = paths[start:start + 32]
        images = []
        for path in batch:
            try:
                images.append(open_image_file(path))
            except (OSError, InvalidImage) as exc:
                return fail(str(exc))
        for path, preds in zip(batch, clf.classify(images, top_k=args.top_k)):
            writer.write(str(path), preds)
    return 0


FORMATS = ("table", "csv", "jsonl")


def expand_image_args(names: list[str]) -> list[Path]:
    """Image files as given, and for a folder its images (sorted, not recursive)."""
    paths: list[Path] = []
    for name in names:
        path = Path(name)
        if path.is_dir():
            found = sorted(p for p in path.iterdir()
                           if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
            if not found:
                raise ValueError(f"{path} holds no images ({', '.join(IMAGE_SUFFIXES)})")
            paths.extend(found)
        else:
            paths.append(path)
    return paths


class PredictionWriter:
    """Writes one image's top-k as a table row, CSV rows (image,rank,label,score) or a JSON line."""

    def __init__(self, fmt: str, out):
        self.fmt, self.out = fmt, out
        if fmt == "csv":
            import csv

            self._csv = csv.writer(out, lineterminator="\n")
            self._csv.writerow(["image", "rank", "label", "score"])

    def write(self, image: str, predictions: list[dict], **extra) -> None:
        if self.fmt == "jsonl":
            print(json.dumps({"image": image, **extra, "predictions": predictions}), file=self.out)
        elif self.fmt == "csv":
            for rank, p in enumerate(predictions, 1):
                self._csv.writerow([image, rank, p["label"], f"{p['score']:.6f}"])
        else:
            print(f"{image}: " + ", ".join(f"{p['label']} {p['score']:.3f}" for p in predictions), file=self.out)
        self.out.flush()


def cmd_export(args) -> int:
    from .pipeline import rebuild_onnx

    precision = "int8" if args.int8 else "fp32"
    path = rebuild_onnx(args.classifier, args.onnx, precision=precision)
    os.chmod(path, 0o666 & ~_current_umask())  # written through mkstemp (0600): make it an ordinary file
    guard = json.loads((Path(args.classifier) / "manifest.json").read_text()).get("int8") if args.int8 else None
    note = "" if not args.int8 else (
        f", int8: its build's guard {'passed' if (guard or {}).get('allowed') else 'did not pass'}"
        + (f" (agreement {guard['agreement']:.3f}, accuracy {guard['accuracy_fp32']:.3f} fp32 -> "
           f"{guard['accuracy_int8']:.3f} int8)" if (guard or {}).get("agreement") is not None else ""))
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB){note}")
    return 0


def cmd_sample(args) -> int:
    from .world import DEMO_CLASSES, DEMO_SHIFT, PRETRAIN_STYLE, write_class_folders

    style = PRETRAIN_STYLE if args.in_domain else DEMO_SHIFT
    written = write_class_folders(Path(args.out), DEMO_CLASSES, n_per_class=args.per_class, seed=args.seed, style=style)
    print(f"wrote {sum(map(len, written.values()))} images of {', '.join(DEMO_CLASSES)} under {args.out}"
          f" ({'the pretraining style' if args.in_domain else 'heavy noise + sepia cast, a shifted domain'})")
    return 0


def add_commands(sub) -> None:
    """The library's subcommands, added to ``sub`` (this module's parser, or the umbrella `rmt`'s)."""
    p = sub.add_parser("tune", help="Tune a classifier from DIR (one folder per class) into --out.",
                       description="Tune a classifier from example images and write it to --out.")
    p.add_argument("data", metavar="DIR",
                   help="Example images, one sub-folder per class (DIR/<label>/<image>), or a split tree: "
                        "DIR/train/<label>/... is tuned on and DIR/test/<label>/... (or val/) is scored "
                        "afterwards, into OUT/test.json.")
    p.add_argument("--out", required=True, metavar="OUT",
                   help="Classifier folder to write (manifest, mask, model, report); written to a temporary "
                        "folder beside it, then renamed into place.")
    p.add_argument("--config", help="JSON file with TuneConfig fields (flags override it).")
    for flag, (name, typ) in _TUNE_FLAGS.items():
        help_text = TuneConfig.__dataclass_fields__[name].metadata.get("help", "")
        kwargs = {"choices": METHODS} if name == "method" else {}
        p.add_argument(flag, type=typ, default=None, help=help_text.replace("%", "%%"), **kwargs)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--force", action="store_true", help="Replace --out if it exists.")
    p.add_argument("--quiet", action="store_true", help="No progress bar.")
    p.add_argument("--providers", default="auto", choices=("auto", "cpu", "cuda"),
                   help="ONNX Runtime providers for scoring DIR/test.")
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("predict", help="Classify images with a tuned classifier (ONNX Runtime, no torch).")
    p.add_argument("classifier", metavar="OUT", help="A classifier folder written by `rmt tune`.")
    p.add_argument("images", metavar="IMAGE", nargs="+", help="Image files, or folders of images.")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--providers", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--format", choices=FORMATS, default="table",
                   help="table (one line per image), csv (image,rank,label,score) or jsonl.")
    p.add_argument("--json", action="store_true", help="Same as --format jsonl.")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("export", help="Rebuild model.onnx from the base weights and the mask file.")
    p.add_argument("classifier", metavar="OUT")
    p.add_argument("--onnx", help="Write here instead of OUT/model.onnx.")
    p.add_argument("--int8", action="store_true",
                   help="Quantize the encoder's MatMul/Gemm weights to int8 (ONNX Runtime dynamic quantization), "
                        "as RMT_SERVING_PRECISION=int8 serves; says whether the build's int8 guard passed.")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("info", help="Show a classifier's manifest.")
    p.add_argument("classifier", metavar="OUT")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("sample", help="Write a generated few-shot sample set (one folder per class).")
    p.add_argument("out")
    p.add_argument("--per-class", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--in-domain", action="store_true", help="Render as in pretraining (zero-shot already works).")
    p.set_defaults(func=cmd_sample)


def build_parser(prog: str = "rmt") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    add_commands(sub)
    for name, (_, help_text) in DISPATCH.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def run(args) -> int:
    """Runs a parsed library subcommand; bad input is one line on stderr and exit status 2."""
    from .threads import apply_process_policy

    apply_process_policy()  # before a library command imports torch: passive OpenMP waits, pools sized to our CPUs
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as exc:
        return fail(str(exc))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in DISPATCH:
        return int(importlib.import_module(DISPATCH[argv[0]][0]).main(argv[1:]) or 0)
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
