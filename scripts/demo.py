"""The main job, end to end in embedded mode (no Redis, nothing else installed):

1. write a generated few-shot sample set (shapes under noise and a colour cast the backbone never saw),
2. start `rmt serve` (API + a Celery worker on the local SQLite broker) on a free loopback port,
3. create a classifier over HTTP with rmt_client, watch the job's progress, classify held-back images,
4. print the validation report (zero-shot vs tuned on the held-out images), stop the server.

    python scripts/demo.py [--data-dir runs/demo-data] [--per-class 16] [--keep-running]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rmt_client import Client  # noqa: E402
from rmt_core.world import DEMO_CLASSES as CLASSES, DEMO_SHIFT as SHIFT, write_class_folders  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(rmt: Client, server: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"rmt serve exited with {server.returncode}")
        if rmt.ready():
            return
        time.sleep(0.5)
    raise SystemExit("rmt serve did not become ready")


def bar(fraction: float, width: int = 30) -> str:
    filled = int(round(fraction * width))
    return "#" * filled + "-" * (width - filled)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(ROOT / "runs" / "demo-data"))
    parser.add_argument("--per-class", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep-running", action="store_true", help="Leave the server up at the end.")
    parser.add_argument("--config", default="{}", help="TuneConfig fields (JSON) over the demo's, e.g. for a "
                                                       'quick run: \'{"epochs": 1, "min_steps": 4}\'')
    args = parser.parse_args()

    samples_dir = ROOT / "runs" / "demo-samples"
    shutil.rmtree(samples_dir, ignore_errors=True)
    train = write_class_folders(samples_dir / "train", CLASSES, args.per_class, seed=args.seed, style=SHIFT)
    test = write_class_folders(samples_dir / "test", CLASSES, 4, seed=args.seed + 1000, style=SHIFT)
    print(f"[1/4] wrote {sum(map(len, train.values()))} training images of {len(CLASSES)} classes "
          f"under {samples_dir} (heavy noise + sepia cast: a domain the backbone never saw)")

    port = free_port()
    env = {**os.environ, "RMT_DATA_DIR": args.data_dir, "RMT_BROKER_URL": ""}
    server_started = time.monotonic()
    server = subprocess.Popen([sys.executable, "-m", "rmt_cli", "serve", "--host", "127.0.0.1",
                               "--port", str(port), "--data-dir", args.data_dir, "--log-level", "warning"],
                              env=env, start_new_session=True)
    rmt = Client(f"http://127.0.0.1:{port}", timeout=60)
    try:
        wait_ready(rmt, server)
        print(f"[2/4] rmt serve is up on http://127.0.0.1:{port} (embedded broker, data in {args.data_dir})")

        config = {"method": "r-amt", "seed": args.seed, "holdout": 0.25, **json.loads(args.config)}
        created = rmt.create(samples_dir / "train", name="demo-shapes", config=config)  # train/<label>/<image>
        print(f"[3/4] created classifier {created.classifier_id}, job {created.job_id} (rmt_client)")
        shown = [None]

        def show(job: dict) -> None:
            p = job.get("progress") or {}
            if p.get("total_steps") and p["step"] != shown[0]:
                shown[0] = p["step"]
                eta = p.get("eta_seconds")
                print(f"\r      {job['status']:9s} [{bar(p['step'] / p['total_steps'])}] step {p['step']}/{p['total_steps']} "
                      f"loss {p['loss']:.3f} acc {p['train_accuracy']:.2f} sparsity {p['sparsity']:.2f}% "
                      f"eta {eta if eta is None else round(eta)}s   ", end="", flush=True)

        job = rmt.wait(created, progress=show, poll=1.0, raise_on_failure=False)
        print()
        if job["status"] != "succeeded":
            raise SystemExit(f"job {job['status']}: {job.get('error')}")
        last = job.get("progress") or {}
        print(f"      final classifier {time.monotonic() - server_started:.1f} s after the server started "
              f"(step {last.get('step')} of {last.get('total_steps')}"
              f"{': ' + last['stop_reason'] if last.get('stop_reason') else ''})")

        clf = rmt.get(created.classifier_id)
        results = rmt.classify(created.classifier_id, [p for paths in test.values() for p in paths], top_k=2)
        correct = sum(Path(r["path"]).parent.name == r["predictions"][0]["label"] for r in results)
        one = results[0]
        print(f"[4/4] classified {len(results)} new images over HTTP: {correct}/{len(results)} correct; "
              f"{Path(one['path']).parent.name}/{one['filename']}: {one['predictions']}")
        print("\nValidation report")
        print(json.dumps({k: clf.get(k) for k in ("labels", "backbone", "method", "sparsity", "validation",
                                                  "artifacts", "status")}, indent=2))
        if args.keep_running:
            print(f"server left running on port {port} (pid {server.pid}); Ctrl-C to stop")
            server.wait()
        return 0
    finally:
        if server.poll() is None and not args.keep_running:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
        rmt.close()


if __name__ == "__main__":
    sys.exit(main())
