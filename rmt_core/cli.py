"""The `rmt` command: tune, predict, export, info, sample (library) and serve, worker, eval.

Only the subcommand that runs imports its heavy modules: `rmt predict` and `rmt serve` never import torch.
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

# `rmt serve` / `rmt worker` / `rmt eval` live in their own packages; the CLI only forwards argv.
DISPATCH = {
    "serve": ("app.server", "Run the HTTP API (and, with the embedded broker, a worker)."),
    "worker": ("worker.main", "Run a Celery tuning worker."),
    "migrate": ("rmt_service.migrate", "Create or upgrade the service's records database (once per deploy)."),
    "eval": ("rmt_core.evaluation", "CoOp few-shot protocol: K shots x seeds, accuracy table."),
}

_TUNE_FLAGS = {
    # flag: (TuneConfig field, type)
    "--method": ("method", str), "--backbone": ("backbone", str), "--pretrained": ("pretrained", str),
    "--epochs": ("epochs", int), "--min-steps": ("min_steps", int), "--lr": ("learning_rate", float),
    "--batch-size": ("batch_size", int), "--threshold": ("threshold", float), "--leak": ("leak", float),
    "--template": ("prompt_template", str), "--seed": ("seed", int), "--holdout": ("holdout", float),
}


def _fail(message: str, code: int = 2) -> int:
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
        return _fail(f"{out} exists; pass --force to replace it")
    samples = samples_from_folders(args.data)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    # disable=None: a bar on a terminal, nothing in a log file (tqdm would write every update there)
    bar = tqdm(total=None, unit="step", disable=True if args.quiet else None, dynamic_ncols=True, mininterval=0.5)

    def report(p):
        bar.total = p.total_steps
        bar.set_postfix(epoch=f"{p.epoch}/{p.epochs}", loss=f"{p.loss:.3f}", acc=f"{p.train_accuracy:.2f}",
                        sparsity=f"{p.sparsity:.2f}%")
        bar.update(p.step - bar.n)

    try:
        manifest = build_classifier(samples, config, tmp, progress=report, device=args.device)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        bar.close()
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
    _print_info(manifest, out)
    return 0


def _print_info(manifest: dict, path: Path) -> None:
    print(f"classifier   {path}")
    print(f"labels       {', '.join(manifest['labels'])}")
    print(f"backbone     {manifest['backbone']} ({manifest['pretrained']}), method {manifest['method']}")
    print(f"steps        {manifest['steps']} in {manifest['epochs']} epochs, {manifest.get('elapsed_s', '?')} s")
    print(f"sparsity     {manifest['sparsity']:.3f}% of {manifest['mask_entries']} mask entries masked out")
    print(f"mask file    {manifest['mask_bytes']} B (entropy bound {manifest['mask_entropy_bound_bytes']} B), "
          f"model.onnx {manifest['onnx_bytes'] / 1e6:.1f} MB, parity {manifest['parity_max_abs_diff']:.2g}")
    val = manifest.get("validation")
    if val:
        print(f"validation   {val['n_holdout']} held-out images: zero-shot {val['zero_shot_accuracy']:.1%} -> "
              f"tuned {val['tuned_accuracy']:.1%}")
    for warning in manifest.get("warnings", []):
        print(f"warning      {warning}")


def cmd_info(args) -> int:
    path = Path(args.classifier)
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except FileNotFoundError:
        return _fail(f"{path} is not a classifier directory (no manifest.json)")
    if args.json:
        print(json.dumps(manifest, indent=2))
    else:
        _print_info(manifest, path)
    return 0


def cmd_predict(args) -> int:
    from .images import InvalidImage, open_image_file
    from .runtime import OnnxClassifier

    clf = OnnxClassifier(args.classifier, providers=args.providers)
    images = []
    for name in args.images:
        try:
            images.append(open_image_file(name))
        except (OSError, InvalidImage) as exc:
            return _fail(str(exc))
    for name, preds in zip(args.images, clf.classify(images, top_k=args.top_k)):
        if args.json:
            print(json.dumps({"image": name, "predictions": preds}))
        else:
            print(f"{name}: " + ", ".join(f"{p['label']} {p['score']:.3f}" for p in preds))
    return 0


def cmd_export(args) -> int:
    from .pipeline import rebuild_onnx

    path = rebuild_onnx(args.classifier, args.onnx)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB), parity checked against torch")
    return 0


def cmd_sample(args) -> int:
    from .world import DEMO_CLASSES, DEMO_SHIFT, PRETRAIN_STYLE, write_class_folders

    style = PRETRAIN_STYLE if args.in_domain else DEMO_SHIFT
    written = write_class_folders(Path(args.out), DEMO_CLASSES, n_per_class=args.per_class, seed=args.seed, style=style)
    print(f"wrote {sum(map(len, written.values()))} images of {', '.join(DEMO_CLASSES)} under {args.out}"
          f" ({'the pretraining style' if args.in_domain else 'heavy noise + sepia cast, a shifted domain'})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rmt", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("tune", help="Tune a classifier from DIR (one folder per class) into --out.")
    p.add_argument("data", metavar="DIR")
    p.add_argument("--out", required=True)
    p.add_argument("--config", help="JSON file with TuneConfig fields (flags override it).")
    for flag, (name, typ) in _TUNE_FLAGS.items():
        help_text = TuneConfig.__dataclass_fields__[name].metadata.get("help", "")
        kwargs = {"choices": METHODS} if name == "method" else {}
        p.add_argument(flag, type=typ, default=None, help=help_text.replace("%", "%%"), **kwargs)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--force", action="store_true", help="Replace --out if it exists.")
    p.add_argument("--quiet", action="store_true", help="No progress bar.")
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("predict", help="Classify images with a tuned classifier (ONNX Runtime, no torch).")
    p.add_argument("classifier", metavar="OUT")
    p.add_argument("images", metavar="IMAGE", nargs="+")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--providers", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("export", help="Rebuild model.onnx from the base weights and the mask file.")
    p.add_argument("classifier", metavar="OUT")
    p.add_argument("--onnx", help="Write here instead of OUT/model.onnx.")
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

    for name, (_, help_text) in DISPATCH.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in DISPATCH:
        module = importlib.import_module(DISPATCH[argv[0]][0])
        return int(module.main(argv[1:]) or 0)
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as exc:
        return _fail(str(exc))


if __name__ == "__main__":
    sys.exit(main())
