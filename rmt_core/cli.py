"""The `rmt` command: tune, predict, export, info, sample (library); serve, worker, eval; remote (a client).

Only the subcommand that runs imports its heavy modules: `rmt predict` and `rmt serve` never import torch, and
`rmt remote` needs only httpx.
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


def settings_problem(exc) -> str:
    """A pydantic ValidationError of the service's Settings as one line per bad RMT_* variable."""
    lines = []
    for error in exc.errors():
        name = "RMT_" + "_".join(str(part) for part in error.get("loc", ())).upper()
        lines.append(f"{name}={error.get('input')!r}: {error.get('msg', 'invalid')}")
    return "invalid configuration (environment or .env):\n  " + "\n  ".join(lines)


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
    samples, test_samples, test_dir = tune_samples(Path(args.data), samples_from_folders)
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
    print(f"steps        {manifest['steps']} in {manifest['epochs']} epochs, {manifest.get('elapsed_s', '?')} s")
    print(f"sparsity     {manifest['sparsity']:.3f}% of {manifest['mask_entries']} mask entries masked out")
    print(f"mask file    {manifest['mask_bytes']} B (entropy bound {manifest['mask_entropy_bound_bytes']} B), "
          + (f"model.onnx {manifest['onnx_bytes'] / 1e6:.1f} MB" if "onnx_bytes" in manifest
             else f"head {manifest.get('head_bytes', 0) / 1e3:.1f} kB on shared base {manifest.get('base_id')}")
          + f", parity {manifest['parity_max_abs_diff']:.2g}")
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
        return _fail(f"{path} is not a classifier directory (no manifest.json)")
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
        return _fail(str(exc))
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
                return _fail(str(exc))
        for path, preds in zip(batch, clf.classify(images, top_k=args.top_k)):
            writer.write(str(path), preds)
    return 0


FORMATS = ("table", "csv", "jsonl")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


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

    path = rebuild_onnx(args.classifier, args.onnx)
    os.chmod(path, 0o666 & ~_current_umask())  # written through mkstemp (0600): make it an ordinary file
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB), parity checked against torch")
    return 0


def cmd_sample(args) -> int:
    from .world import DEMO_CLASSES, DEMO_SHIFT, PRETRAIN_STYLE, write_class_folders

    style = PRETRAIN_STYLE if args.in_domain else DEMO_SHIFT
    written = write_class_folders(Path(args.out), DEMO_CLASSES, n_per_class=args.per_class, seed=args.seed, style=style)
    print(f"wrote {sum(map(len, written.values()))} images of {', '.join(DEMO_CLASSES)} under {args.out}"
          f" ({'the pretraining style' if args.in_domain else 'heavy noise + sepia cast, a shifted domain'})")
    return 0


# -- rmt remote: the same tasks against a running service, through rmt_client ---------------------------------
DEFAULT_URL = "http://127.0.0.1:8000"


def _remote(args):
    from rmt_client import Client

    return Client(args.url or os.environ.get("RMT_URL") or DEFAULT_URL,
                  api_key=args.api_key or os.environ.get("RMT_API_KEY") or None, timeout=args.timeout)


def _print_json(value) -> None:
    print(json.dumps(value, indent=2))


def _progress_line(job: dict) -> None:
    p = job.get("progress") or {}
    parts = [job["status"]]
    if p.get("total_steps"):
        parts.append(f"step {p.get('step')}/{p['total_steps']}")
    for key, fmt in (("loss", "loss {:.3f}"), ("train_accuracy", "acc {:.2f}"), ("eta_seconds", "eta {:.0f}s")):
        if p.get(key) is not None:
            parts.append(fmt.format(p[key]))
    print("  " + "  ".join(parts), file=sys.stderr, flush=True)


def remote_create(args, rmt) -> int:
    config = {}
    if args.config:
        text = Path(args.config).read_text() if Path(args.config).is_file() else args.config
        config = json.loads(text)
    for flag, name in (("method", "method"), ("epochs", "epochs")):
        if getattr(args, flag) is not None:
            config[name] = getattr(args, flag)
    created = rmt.create(args.source, name=args.name, config=config or None)
    if not args.wait:
        if args.json:
            _print_json({"classifier_id": created.classifier_id, "job_id": created.job_id, "status": "queued"})
        else:
            print(f"created {created.classifier_id} (job {created.job_id}); follow it with "
                  f"`rmt remote status {created.job_id}`")
        return 0
    if not args.json:
        print(f"created {created.classifier_id} (job {created.job_id}), waiting", file=sys.stderr)
    job = rmt.wait(created, progress=None if args.json else _progress_line, raise_on_failure=False)
    classifier = rmt.get(created.classifier_id)
    if args.json:
        _print_json({"job": job, "classifier": classifier})
    else:
        _print_classifier(classifier)
    return 0 if job["status"] == "succeeded" else 1


def _print_classifier(c: dict) -> None:
    print(f"classifier   {c['classifier_id']} {c.get('name') or ''}".rstrip())
    print(f"status       {c['status']} (job {c['job_id']})")
    print(f"labels       {', '.join(c['labels'])}")
    print(f"backbone     {c.get('backbone')} ({c.get('pretrained')}), method {c.get('method')}")
    val = c.get("validation") or {}
    if val.get("tuned_accuracy") is not None:
        print(f"validation   {val.get('n_holdout')} held-out images: zero-shot {val['zero_shot_accuracy']:.1%} -> "
              f"tuned {val['tuned_accuracy']:.1%}")
    if c.get("error"):
        print(f"error        {c['error']['code']}: {c['error']['message']}")


def remote_status(args, rmt) -> int:
    if args.id.startswith("job_"):
        job = rmt.job(args.id)
        if args.json:
            _print_json(job)
        else:
            print(f"job          {job['job_id']} for {job['classifier_id']}")
            _progress_line(job)
            if job.get("error"):
                print(f"error        {job['error']['code']}: {job['error']['message']}")
        return 0
    classifier = rmt.get(args.id)
    if args.json:
        _print_json(classifier)
    else:
        _print_classifier(classifier)
    return 0


def remote_classify(args, rmt) -> int:
    try:
        paths = expand_image_args(args.images)
    except ValueError as exc:
        return _fail(str(exc))
    writer = PredictionWriter("jsonl" if args.json else args.format, sys.stdout)
    for result in rmt.classify(args.classifier, paths, top_k=args.top_k):
        writer.write(result.get("path") or result.get("filename"), result["predictions"])
    return 0


def remote_list(args, rmt) -> int:
    items = rmt.list()
    if args.json:
        _print_json(items)
        return 0
    for c in items:
        acc = (c.get("validation") or {}).get("tuned_accuracy")
        print(f"{c['classifier_id']}  {c['status']:9s}  {(c.get('name') or '-')[:24]:24s}  "
              f"{'' if acc is None else f'{acc:.0%} '}{', '.join(c['labels'])}")
    if not items:
        print("no classifiers yet", file=sys.stderr)
    return 0


def remote_delete(args, rmt) -> int:
    rmt.delete(args.classifier)
    if args.json:
        _print_json({"deleted": args.classifier})
    else:
        print(f"deleted {args.classifier}")
    return 0


def remote_export(args, rmt) -> int:
    path = rmt.export(args.classifier, args.out) if args.out.endswith(".zip") else \
        rmt.download_model(args.classifier, args.out)
    if args.json:
        _print_json({"path": str(path), "bytes": path.stat().st_size})
    else:
        print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0


def cmd_remote(args) -> int:
    import httpx

    from rmt_client import RmtError

    try:
        with _remote(args) as rmt:
            return int(args.remote_func(args, rmt) or 0)
    except RmtError as exc:
        return _fail(f"the service answered {exc.status} {exc.code}: {exc.message}", 1)
    except httpx.TransportError as exc:
        return _fail(f"cannot reach the service at {args.url or os.environ.get('RMT_URL') or DEFAULT_URL}: {exc} "
                     "(start one with `rmt serve`, or pass --url)", 1)


# -- rmt remote versions | update | add-class | serve | feedback: a classifier that evolves ------------------------
def _print_versions(versions: list[dict]) -> None:
    for v in versions:
        acc = v.get("published_accuracy")
        counts = ", ".join(f"{label} {n}" for label, n in (v.get("images") or {}).items())
        print(f"{'*' if v['serving'] else ' '} {v['version_id']}  {v['source']:13s}  "
              f"{'final  ' if v['final'] else 'preview'}  {'' if acc is None else f'{acc:.0%}  '}{counts}")


def remote_versions(args, rmt) -> int:
    versions = rmt.versions(args.classifier)
    if args.json:
        _print_json(versions)
    else:
        _print_versions(versions)  # * marks the serving version
    return 0


def remote_update(args, rmt) -> int:
    config = json.loads(Path(args.config).read_text() if args.config and Path(args.config).is_file()
                        else args.config or "{}")
    created = rmt.update(args.classifier, args.add, remove_labels=args.remove or (),
                         include_feedback=args.feedback, config=config, force=args.force)
    if not args.wait:
        if args.json:
            _print_json({"classifier_id": created.classifier_id, "job_id": created.job_id, "status": "queued"})
        else:
            print(f"update queued as job {created.job_id}; follow it with `rmt remote status {created.job_id}`")
        return 0
    job = rmt.wait(created, progress=None if args.json else _progress_line, raise_on_failure=False)
    report = job.get("update") or {}
    if args.json:
        _print_json(job)
    elif job["status"] == "succeeded":
        print(f"version {report.get('version_id')} {'serves' if report.get('served') else 'kept, not served'}: "
              f"{report.get('reason')}")
    else:
        print(f"update {job['status']}: {(job.get('error') or {}).get('message', '')}")
    return 0 if job["status"] == "succeeded" else 1


def remote_add_class(args, rmt) -> int:
    version = rmt.add_class(args.classifier, args.name, prompt=args.prompt)
    if args.json:
        _print_json(version)
    else:
        print(f"class {args.name!r} added by name: version {version['version_id']} serves now")
    return 0


def remote_serve(args, rmt) -> int:
    version = rmt.serve(args.classifier, args.version)
    if args.json:
        _print_json(version)
    else:
        print(f"version {version['version_id']} serves {args.classifier} now")
    return 0


def remote_feedback(args, rmt) -> int:
    if args.image is None:
        items = rmt.list_feedback(args.classifier)
        if args.json:
            _print_json(items)
        for f in [] if args.json else items:
            print(f"{f['feedback_id']}  {f['label']:20s}  (was {f.get('prediction') or '?'})")
        return 0
    if not args.label:
        return _fail("give --label, the right label of the image")
    feedback_id = rmt.feedback(args.classifier, args.image, args.label, prediction=args.prediction)
    if args.json:
        _print_json({"feedback_id": feedback_id})
    else:
        print(f"recorded {feedback_id}; retrain with `rmt remote update {args.classifier} --feedback`")
    return 0


def _add_version_parsers(rsub, common) -> None:
    p = rsub.add_parser("versions", parents=[common], help="A classifier's versions (* = serving).")
    p.add_argument("classifier", metavar="CLASSIFIER_ID")
    p.set_defaults(remote_func=remote_versions)

    p = rsub.add_parser("update", parents=[common],
                        help="A new version: add images/classes, remove classes, retrain with feedback.")
    p.add_argument("classifier", metavar="CLASSIFIER_ID")
    p.add_argument("--add", metavar="DIR|ZIP", help="Images to add, one sub-folder per class (new names add classes).")
    p.add_argument("--remove", action="append", metavar="LABEL", help="A class to drop (repeatable).")
    p.add_argument("--feedback", action="store_true", help="Add the recorded feedback images.")
    p.add_argument("--config", help="Settings over the serving version's, as JSON or a JSON file.")
    p.add_argument("--force", action="store_true", help="Serve the new version even if it is worse.")
    p.add_argument("--wait", action="store_true", help="Follow the job and say whether the new version serves.")
    p.set_defaults(remote_func=remote_update)

    p = rsub.add_parser("add-class", parents=[common], help="Add a class by its name alone (serves at once).")
    p.add_argument("classifier", metavar="CLASSIFIER_ID")
    p.add_argument("name")
    p.add_argument("--prompt", help="The text to embed (default: the classifier's template around NAME).")
    p.set_defaults(remote_func=remote_add_class)

    p = rsub.add_parser("serve", parents=[common], help="Serve a version (rollback or roll forward).")
    p.add_argument("classifier", metavar="CLASSIFIER_ID")
    p.add_argument("version", metavar="VERSION_ID")
    p.set_defaults(remote_func=remote_serve)

    p = rsub.add_parser("feedback", parents=[common],
                        help="Record a wrongly classified image with its right label, or list the feedback.")
    p.add_argument("classifier", metavar="CLASSIFIER_ID")
    p.add_argument("image", nargs="?", help="The image (omit to list the feedback).")
    p.add_argument("--label", help="Its right label.")
    p.add_argument("--prediction", help="The label the classifier gave it.")
    p.set_defaults(remote_func=remote_feedback)


def _add_remote_parser(sub) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", help=f"The service (default: $RMT_URL or {DEFAULT_URL}).")
    common.add_argument("--api-key", help="API key, if the service has keys (default: $RMT_API_KEY).")
    common.add_argument("--json", action="store_true", help="Machine-readable output.")
    common.add_argument("--timeout", type=float, default=120.0, help="Seconds per HTTP request.")
    remote = sub.add_parser("remote", help="Create, follow and use classifiers on a running service.",
                            description="Talk to a running `rmt serve` (or a deployment) over HTTP.")
    rsub = remote.add_subparsers(dest="remote_command", required=True)

    p = rsub.add_parser("create", parents=[common], help="Upload examples and queue tuning.")
    p.add_argument("source", metavar="DIR|ZIP", help="A folder with one sub-folder per class, or such a zip.")
    p.add_argument("--name")
    p.add_argument("--config", help="TuneConfig fields as a JSON object, or a JSON file.")
    p.add_argument("--method", choices=METHODS)
    p.add_argument("--epochs", type=int)
    p.add_argument("--wait", action="store_true", help="Follow the job (progress on stderr) until it ends.")
    p.set_defaults(remote_func=remote_create)

    p = rsub.add_parser("status", parents=[common], help="A classifier (clf_...) or a job (job_...).")
    p.add_argument("id", metavar="ID")
    p.set_defaults(remote_func=remote_status)

    p = rsub.add_parser("classify", parents=[common], help="Classify image files or folders.")
    p.add_argument("classifier", metavar="CLASSIFIER_ID")
    p.add_argument("images", metavar="IMAGE", nargs="+", help="Image files, or folders of images.")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--format", choices=FORMATS, default="table")
    p.set_defaults(remote_func=remote_classify)

    p = rsub.add_parser("list", parents=[common], help="Your classifiers, newest first.")
    p.set_defaults(remote_func=remote_list)

    p = rsub.add_parser("delete", parents=[common], help="Delete a classifier (cancels its job).")
    p.add_argument("classifier", metavar="CLASSIFIER_ID")
    p.set_defaults(remote_func=remote_delete)

    p = rsub.add_parser("export", parents=[common],
                        help="Download the export bundle (OUT.zip) or the ONNX model (any other name).")
    p.add_argument("classifier", metavar="CLASSIFIER_ID")
    p.add_argument("out", metavar="OUT")
    p.set_defaults(remote_func=remote_export)
    _add_version_parsers(rsub, common)
    remote.set_defaults(func=cmd_remote)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rmt", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

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

    _add_remote_parser(sub)

    for name, (_, help_text) in DISPATCH.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in DISPATCH:
        module = importlib.import_module(DISPATCH[argv[0]][0])
        try:
            return int(module.main(argv[1:]) or 0)
        except Exception as exc:  # noqa: BLE001 - only invalid settings are answered here
            if type(exc).__name__ != "ValidationError" or not hasattr(exc, "errors"):
                raise
            return _fail(settings_problem(exc))
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as exc:
        return _fail(str(exc))


if __name__ == "__main__":
    sys.exit(main())
