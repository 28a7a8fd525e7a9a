"""Versions benchmark (issue 19): a class added by name, an update against a rebuild, harmful updates.

In one process over a fresh SQLite data dir: the API as FastAPI's TestClient (real routes, real cache, real
ONNX Runtime), jobs run by the worker's own ``run_tune_job`` (what the Celery task calls). Data: the world's
shapes under the demo domain shift (``rmt sample``'s task), builtin backbone, test images drawn with another
seed. It measures
  1. add a class by name: POST /classes -> the first classify whose answer lists the new label (warm: the
     classifier and its base are loaded; goal <= 2 s), and the new class's accuracy on its test images;
  2. update (one new class + 20% more images of the others, mask warm-started) against a rebuild from scratch
     on the same images: time to final and test accuracy of each, and the time ratio;
  3. ``--harmful`` updates that each add mislabelled images: the serving version's test accuracy must never
     drop (beyond what the held-out comparison can see: its margin is 0 on those images).

    flock /tmp/rmt-bench.lock .venv/bin/python bench/bench_versions.py [--per-class 10] [--epochs 10] \
        [--harmful 10] [--out bench/RESULTS-versions.md]

``--warm-seeds N`` runs only the warm-start comparison, once per seed: a first build pinned to publish a mask
(``select: "mask"``; under ``auto`` small uploads often publish a mask-free candidate, which leaves nothing to
warm-start from), then the same update (same parent, same images, same held-out split) twice, with the parent's
mask as the start and without it (the bench swaps worker.updates.parent_mask_bits for one returning None, the
only switch there is), and a rebuild from scratch on the same images.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
GOAL_CLASS_BY_NAME_S = 2.0
BASE_CLASSES = ("circle", "square", "triangle", "star")
NEW_CLASS = "hexagon"
NAMED_CLASSES = ("cross", "diamond", "crescent")


class NoBroker:
    """Jobs are run here by run_job, not sent anywhere."""

    def enqueue(self, job_id: str) -> None:
        pass

    def ping(self) -> None:
        pass

    def close(self) -> None:
        pass


def write_images(root: Path, classes, n: int, seed: int) -> dict[str, list[Path]]:
    from rmt_core.world import DEMO_SHIFT, write_class_folders

    return write_class_folders(root, list(classes), n, seed, style=DEMO_SHIFT)


def parts(pairs: list[tuple[Path, str]], data: dict) -> list:
    out = [("files", (p.name, p.read_bytes(), "image/png")) for p, _ in pairs]
    out += [("labels", (None, label)) for _, label in pairs]
    out += [(k, (None, v)) for k, v in data.items()]
    return out


def accuracy(store, version, test: list[tuple[Path, str]]) -> float:
    from worker.updates import accuracy_on

    labels = set((version.manifest or {}).get("labels") or [])
    return accuracy_on(store.version_dir(version), store.bases_dir, [s for s in test if s[1] in labels])


def run_job(store, settings, job_id: str) -> float:
    from worker.tasks import run_tune_job

    t0 = time.perf_counter()
    outcome = run_tune_job(store, settings, job_id)
    if outcome != "succeeded":
        raise SystemExit(f"job {job_id} ended {outcome}: {store.get_job(job_id)}")
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-class", type=int, default=10, help="Training images per class of the first build.")
    ap.add_argument("--test-per-class", type=int, default=30)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--min-steps", type=int, default=60, help="TuneConfig.min_steps (its default, 300, is slow here).")
    ap.add_argument("--harmful", type=int, default=10, help="Updates with mislabelled images.")
    ap.add_argument("--warm-seeds", type=int, default=0,
                    help="Run only the warm-start comparison (select=mask), for seeds 0..N-1.")
    ap.add_argument("--out", default=None, help="Append the results table to this markdown file.")
    args = ap.parse_args(argv)
    if args.warm_seeds:
        return warm_start_comparison(args)

    from fastapi.testclient import TestClient

    from app.main import create_app
    from rmt_service.settings import Settings
    from rmt_service.store import Store

    tmp = Path(tempfile.mkdtemp(prefix="rmt-bench-versions-"))
    settings = Settings(_env_file=None, data_dir=tmp / "data", database_url="", broker_url="", api_keys="",
                        api_keys_file=None, device="cpu", max_queued_jobs=50)
    train = write_images(tmp / "train", BASE_CLASSES, args.per_class, seed=1)
    extra_n = max(1, round(0.2 * args.per_class))
    extra = write_images(tmp / "extra", BASE_CLASSES, extra_n, seed=2)
    new = write_images(tmp / "new", (NEW_CLASS,), args.per_class, seed=3)
    wrong = write_images(tmp / "wrong", BASE_CLASSES, 3 * args.harmful, seed=4)
    test_dirs = write_images(tmp / "test", (*BASE_CLASSES, NEW_CLASS, *NAMED_CLASSES), args.test_per_class, seed=9)
    test = [(p, label) for label, paths in test_dirs.items() for p in paths]
    config = {"epochs": args.epochs, "min_steps": args.min_steps}
    results: dict = {"config": config, "per_class": args.per_class}
    store = Store(settings)
    with TestClient(create_app(settings, queue=NoBroker())) as client:
        first_pairs = [(p, label) for label, paths in train.items() for p in paths]
        created = client.post("/v1/classifiers", files=parts(first_pairs, {"config": json.dumps(config)})).json()
        cid = created["classifier_id"]
        results["first_build_s"] = run_job(store, settings, created["job_id"])
        parent = store.current_version(cid)
        results["first_accuracy"] = accuracy(store, parent, test)
        probe = {label: paths[0].read_bytes() for label, paths in test_dirs.items()}
        client.post(f"/v1/classifiers/{cid}/classify", files={"file": ("w.png", probe["circle"], "image/png")})

        # 1. classes by name (warm: the classifier and its base are loaded)
        latencies, named_acc = [], {}
        for name in NAMED_CLASSES:
            t0 = time.perf_counter()
            r = client.post(f"/v1/classifiers/{cid}/classes", json={"name": name})
            assert r.status_code == 201, r.text
            answer = client.post(f"/v1/classifiers/{cid}/classify", params={"top_k": 100},
                                 files={"file": ("x.png", probe[name], "image/png")}).json()
            latencies.append(time.perf_counter() - t0)
            assert name in {p["label"] for p in answer["predictions"]}, answer
            named_acc[name] = accuracy(store, store.current_version(cid), [s for s in test if s[1] == name])
        results["class_by_name_s"] = {"median": statistics.median(latencies), "max": max(latencies)}
        results["class_by_name_accuracy"] = named_acc
        results["accuracy_with_named"] = accuracy(store, store.current_version(cid), test)
        client.post(f"/v1/classifiers/{cid}/versions/{parent.version_id}/serve")  # back to the trained one

        # 2. update (new class + 20% more images) vs a rebuild on the same images
        added = [(p, label) for label, paths in extra.items() for p in paths] + \
            [(p, NEW_CLASS) for p in new[NEW_CLASS]]
        r = client.post(f"/v1/classifiers/{cid}/versions", files=parts(added, {"config": json.dumps(config)}))
        assert r.status_code == 202, r.text
        update_s = run_job(store, settings, r.json()["job_id"])
        report = client.get(f"/v1/jobs/{r.json()['job_id']}").json()["update"]
        updated = store.get_version(cid, report["version_id"])
        rebuild = client.post("/v1/classifiers", files=parts(first_pairs + added, {"config": json.dumps(config)})).json()
        rebuild_s = run_job(store, settings, rebuild["job_id"])
        rebuilt = store.current_version(rebuild["classifier_id"])
        results["update"] = {"update_s": update_s, "rebuild_s": rebuild_s, "ratio": update_s / rebuild_s,
                             "update_accuracy": accuracy(store, updated, test),
                             "rebuild_accuracy": accuracy(store, rebuilt, test),
                             "served": report["served"], "reason": report["reason"],
                             "warm_start": report["warm_start"], "compared_on": report["compared_on"]}
        if not report["served"]:
            client.post(f"/v1/classifiers/{cid}/versions/{updated.version_id}/serve")

        # 3. harmful updates: images of one class labelled as another
        history = []
        serving = store.current_version(cid)
        before = accuracy(store, serving, test)
        for i in range(args.harmful):
            source = BASE_CLASSES[i % len(BASE_CLASSES)]
            target = BASE_CLASSES[(i + 1) % len(BASE_CLASSES)]
            bad = [(p, target) for p in wrong[source][3 * i:3 * i + 3]]
            r = client.post(f"/v1/classifiers/{cid}/versions", files=parts(bad, {"config": json.dumps(config)}))
            assert r.status_code == 202, r.text
            seconds = run_job(store, settings, r.json()["job_id"])
            rep = client.get(f"/v1/jobs/{r.json()['job_id']}").json()["update"]
            candidate = store.get_version(cid, rep["version_id"])
            serving = store.current_version(cid)
            after = accuracy(store, serving, test)
            history.append({"served": rep["served"], "held_parent": rep["parent_accuracy"],
                            "held_new": rep["new_accuracy"], "candidate_test": accuracy(store, candidate, test),
                            "serving_test_before": before, "serving_test_after": after, "s": seconds})
            before = after
        results["harmful"] = history
    store.close()
    results["machine"] = {"nproc": os.cpu_count(), "cpu": _cpu(), "python": platform.python_version()}
    print(json.dumps(results, indent=2, default=str))
    if args.out:
        with open(args.out, "a") as fh:
            fh.write(table(results, args))
    return 0


def warm_start_comparison(args) -> int:
    """Per seed: first build (mask published), update warm vs the same update cold, rebuild from scratch."""
    from fastapi.testclient import TestClient

    import worker.updates as updates
    from app.main import create_app
    from rmt_service.settings import Settings
    from rmt_service.store import Store

    runs = []
    for seed in range(args.warm_seeds):
        tmp = Path(tempfile.mkdtemp(prefix=f"rmt-bench-warm-{seed}-"))
        settings = Settings(_env_file=None, data_dir=tmp / "data", database_url="", broker_url="", api_keys="",
                            api_keys_file=None, device="cpu", max_queued_jobs=50)
        base = 100 * seed
        train = write_images(tmp / "train", BASE_CLASSES, args.per_class, seed=base + 1)
        extra = write_images(tmp / "extra", BASE_CLASSES, max(1, round(0.2 * args.per_class)), seed=base + 2)
        new = write_images(tmp / "new", (NEW_CLASS,), args.per_class, seed=base + 3)
        test_dirs = write_images(tmp / "test", (*BASE_CLASSES, NEW_CLASS), args.test_per_class, seed=base + 9)
        test = [(p, label) for label, paths in test_dirs.items() for p in paths]
        config = json.dumps({"epochs": args.epochs, "min_steps": args.min_steps, "seed": seed, "select": "mask"})
        store = Store(settings)
        run: dict = {"seed": seed}
        with TestClient(create_app(settings, queue=NoBroker())) as client:
            first_pairs = [(p, label) for label, paths in train.items() for p in paths]
            created = client.post("/v1/classifiers", files=parts(first_pairs, {"config": config})).json()
            cid = created["classifier_id"]
            run["first_build_s"] = run_job(store, settings, created["job_id"])
            parent = store.current_version(cid)
            run["first_has_mask"] = bool((parent.manifest or {}).get("mask_file"))
            # an all-kept mask (nothing flipped) would make warm and cold the same start
            run["first_sparsity"] = (parent.manifest or {}).get("sparsity")
            run["first_accuracy"] = accuracy(store, parent, test)
            added = [(p, label) for label, paths in extra.items() for p in paths] + \
                [(p, NEW_CLASS) for p in new[NEW_CLASS]]
            for mode in ("warm", "cold"):
                # both updates start from the first build (the same images map to the same uploads)
                client.post(f"/v1/classifiers/{cid}/versions/{parent.version_id}/serve")
                saved = updates.parent_mask_bits
                if mode == "cold":
                    updates.parent_mask_bits = lambda *a, **k: None
                try:
                    r = client.post(f"/v1/classifiers/{cid}/versions", files=parts(added, {"config": config}))
                    assert r.status_code == 202, r.text
                    seconds = run_job(store, settings, r.json()["job_id"])
                finally:
                    updates.parent_mask_bits = saved
                rep = client.get(f"/v1/jobs/{r.json()['job_id']}").json()["update"]
                version = store.get_version(cid, rep["version_id"])
                run[mode] = {"s": seconds, "accuracy": accuracy(store, version, test), "warm_start": rep["warm_start"],
                             "held_new": rep["new_accuracy"], "held_parent": rep["parent_accuracy"],
                             "served": rep["served"], "sparsity": (version.manifest or {}).get("sparsity"), "has_mask": bool((version.manifest or {}).get("mask_file"))}
            rebuild = client.post("/v1/classifiers", files=parts(first_pairs + added, {"config": config})).json()
            seconds = run_job(store, settings, rebuild["job_id"])
            run["rebuild"] = {"s": seconds, "accuracy": accuracy(store, store.current_version(rebuild["classifier_id"]),
                                                                 test)}
        store.close()
        print(json.dumps(run, default=str), flush=True)
        runs.append(run)
    results = {"runs": runs, "machine": {"nproc": os.cpu_count(), "cpu": _cpu(), "python": platform.python_version()}}
    print(json.dumps(results, indent=2, default=str))
    if args.out:
        with open(args.out, "a") as fh:
            fh.write(warm_table(results, args))
    return 0


def warm_table(r: dict, args) -> str:
    lines = [
        f"\n## {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC — `bench/bench_versions.py --warm-seeds "
        f"{args.warm_seeds} --per-class {args.per_class} --epochs {args.epochs} --min-steps {args.min_steps}`\n",
        f"Machine: {r['machine']['cpu']}, nproc {r['machine']['nproc']}, shared with other developers' jobs "
        "(absolute times are loaded-machine times; compare the ratios, each within one seed's run). "
        f"Config `select: \"mask\"` for every build; {args.per_class} training images per class of "
        f"{', '.join(BASE_CLASSES)}, the update adds {NEW_CLASS} ({args.per_class}) and 20% more of each; "
        f"{args.test_per_class} test images per class. Accuracy is on the test images of the version's classes.\n",
        "| seed | first build s / acc / mask sparsity | update warm s / acc (warm start applied) | update cold s / acc | "
        "rebuild s / acc | warm/cold time | warm/rebuild time |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in r["runs"]:
        w, c, b = run["warm"], run["cold"], run["rebuild"]
        lines.append(
            f"| {run['seed']} | {run['first_build_s']:.1f} / {run['first_accuracy']:.1%} / {run['first_sparsity']:.1f}% | "
            f"{w['s']:.1f} / "
            f"{w['accuracy']:.1%} ({'yes' if w['warm_start'] else 'NO'}) | {c['s']:.1f} / {c['accuracy']:.1%} | "
            f"{b['s']:.1f} / {b['accuracy']:.1%} | {w['s'] / c['s']:.2f} | {w['s'] / b['s']:.2f} |")
    lines.append("")
    return "\n".join(lines)


def _cpu() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5).stdout
        return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "?")
    except (OSError, subprocess.SubprocessError):
        return platform.processor() or "?"


def table(r: dict, args) -> str:
    cbn, up = r["class_by_name_s"], r["update"]
    drops = [h["serving_test_before"] - h["serving_test_after"] for h in r["harmful"]]
    served = sum(h["served"] for h in r["harmful"])
    worse_candidates = sum(h["candidate_test"] < h["serving_test_before"] for h in r["harmful"])
    lines = [
        f"\n## {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC — `bench/bench_versions.py --per-class "
        f"{args.per_class} --epochs {args.epochs} --min-steps {args.min_steps} --harmful {args.harmful}`\n",
        f"Machine: {r['machine']['cpu']}, nproc {r['machine']['nproc']}, shared with other developers' jobs "
        "(absolute times are loaded-machine times; ratios are within one run). Data: world shapes under the "
        f"demo shift, {', '.join(BASE_CLASSES)}; {args.per_class} training and {args.test_per_class} test images "
        "per class; builtin backbone (rmt-world-vit).\n",
        "| measure | value | goal |", "|---|---|---|",
        f"| first build: time / test accuracy | {r['first_build_s']:.1f} s / {r['first_accuracy']:.1%} | |",
        f"| add a class by name: POST → classify lists it (median / max of {len(NAMED_CLASSES)}) | "
        f"{cbn['median']:.3f} s / {cbn['max']:.3f} s | ≤ 2 s |",
        f"| named classes' zero-shot test accuracy | "
        f"{', '.join(f'{k} {v:.0%}' for k, v in r['class_by_name_accuracy'].items())} | |",
        f"| update (+{NEW_CLASS}, +20% images, warm start) time / rebuild time | {up['update_s']:.1f} s / "
        f"{up['rebuild_s']:.1f} s = **{up['ratio']:.2f}** | < 1 |",
        f"| update / rebuild test accuracy | {up['update_accuracy']:.1%} / {up['rebuild_accuracy']:.1%} | "
        "update not lower |",
        f"| update served? | {up['served']} ({up['reason']}) | |",
        f"| harmful updates served | {served} of {len(r['harmful'])} ({worse_candidates} candidates were worse on "
        "the test set) | |",
        f"| largest drop of the serving version's test accuracy | {max(drops, default=0):+.1%} | ≤ 0 (the rule's "
        "margin on its held-out images) |",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
