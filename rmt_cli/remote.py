"""`rmt remote`: create, follow and use classifiers on a running service, through rmt_client."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from rmt_core.cli import FORMATS, PredictionWriter, expand_image_args, fail
from rmt_core.config import METHODS

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
    if p.get("stop_reason"):
        parts.append(f"stopped early: {p['stop_reason']}")
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
        return fail(str(exc))
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
        return fail("give --label, the right label of the image")
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


def cmd_remote(args) -> int:
    import httpx

    from rmt_client import RmtError

    try:
        with _remote(args) as rmt:
            return int(args.remote_func(args, rmt) or 0)
    except RmtError as exc:
        return fail(f"the service answered {exc.status} {exc.code}: {exc.message}", 1)
    except httpx.TransportError as exc:
        return fail(f"cannot reach the service at {args.url or os.environ.get('RMT_URL') or DEFAULT_URL}: {exc} "
                     "(start one with `rmt serve`, or pass --url)", 1)


def add_parser(sub) -> None:
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


