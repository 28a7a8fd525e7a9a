"""Instant preview benchmark: time from create (HTTP 202) to the first usable classify, and to the head.

Starts an embedded `rmt serve` (API + one Celery worker on the local SQLite broker) on a fresh data
directory, then creates ``--runs`` classifiers one after another from `rmt sample` images (5 classes x
``--per-class``, builtin backbone, default config) and, for each, polls classify until it answers:
  - first classify: the 202 -> the first 200 from classify (the zero-shot preview, `final: false`);
  - head: the 202 -> the job showing the fitted head as its preview (only when the head validated better
    than zero-shot), and the 202 -> the first tuning step (the head candidate is built before tuning, so
    this bounds its time either way).
Each job is cancelled once the head is in (the full tuning run is not what this measures). The first run
pays what is cold on a fresh data directory (the API's first ORT sessions; the shared base, unless the worker
exported it at start: RMT_PREPARE_DEFAULT_BASE, on by default, and done if the worker got there within
``--settle`` seconds after /readyz, which the bench reports from the server log); the later runs show the warm
path. Goals (issues 10, 17): first classify <= 2 s also on a fresh data directory, head <= 30 s on 2 CPU cores.

    .venv/bin/python bench/bench_preview.py [--runs 3] [--per-class 16] [--settle 3] [--env RMT_X=V]
                                            [--append bench/RESULTS-selection.md]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOAL_FIRST_S, GOAL_HEAD_S = 2.0, 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def multipart(fields: list[tuple[str, str | tuple[str, bytes, str]]]) -> tuple[bytes, str]:
    boundary = "rmtbench" + uuid.uuid4().hex
    out = io.BytesIO()
    for name, value in fields:
        out.write(f"--{boundary}\r\n".encode())
        if isinstance(value, tuple):
            filename, data, ctype = value
            out.write(f'Content-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                      f"Content-Type: {ctype}\r\n\r\n".encode())
            out.write(data)
        else:
            out.write(f'Content-Disposition: form-data; name="{name}"\r\n\r\n{value}'.encode())
        out.write(b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


def request(base: str, method: str, path: str, body: bytes | None = None, ctype: str | None = None):
    req = urllib.request.Request(base + path, data=body, method=method,
                                 headers={"Content-Type": ctype} if ctype else {})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def one_run(base: str, create_body: tuple[bytes, str], probe: tuple[bytes, str], timeout: float) -> dict:
    t0 = time.monotonic()
    status, created = request(base, "POST", "/v1/classifiers", *create_body)
    t202 = time.monotonic()
    if status != 202:
        raise SystemExit(f"create answered {status}: {created}")
    cid, job_id = created["classifier_id"], created["job_id"]
    out = {"create_s": round(t202 - t0, 3), "schedule_total_steps": created["schedule"]["total_steps"],
           "first_s": None, "first_model": None, "head_preview_s": None, "tuning_started_s": None}
    while time.monotonic() - t202 < timeout:
        now = time.monotonic() - t202
        if out["first_s"] is None:
            status, answer = request(base, "POST", f"/v1/classifiers/{cid}/classify", *probe)
            if status == 200:
                out["first_s"], out["first_model"] = round(time.monotonic() - t202, 3), answer["model"]
                assert answer["final"] is False, answer
        status, job = request(base, "GET", f"/v1/jobs/{job_id}")
        preview = (job or {}).get("preview") or {}
        if preview.get("model") == "head" and out["head_preview_s"] is None:
            out["head_preview_s"] = round(now, 3)
            out["head_accuracy"] = preview.get("accuracy")
        if (job or {}).get("progress") and out["tuning_started_s"] is None:
            out["tuning_started_s"] = round(now, 3)
            out["preview_at_tuning"] = preview
        if job.get("status") in ("succeeded", "failed", "cancelled"):
            out["ended"] = job["status"]
            break
        if out["first_s"] is not None and out["tuning_started_s"] is not None:
            break
        time.sleep(0.05)
    request(base, "DELETE", f"/v1/jobs/{job_id}")
    return out


def prepared_after(log_path: Path, since: float) -> float | None:
    """Seconds from ``since`` (wall clock) to the worker's "default base ... exported/already stored" log line, if
    it has logged one yet (negative: before ``since``)."""
    for line in log_path.read_text(errors="replace").splitlines():
        if "default base" in line and ("exported in" in line or "already stored in" in line):
            try:
                stamp = time.mktime(time.strptime(line[:19], "%Y-%m-%d %H:%M:%S")) + int(line[20:23]) / 1000
            except ValueError:
                return None
            return round(stamp - since, 2)
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--per-class", type=int, default=16)
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--append", type=Path, default=None, help="Append the results table to this markdown file.")
    parser.add_argument("--settle", type=float, default=3.0,
                        help="Seconds between /readyz answering and the first create (0: a user who creates at once).")
    parser.add_argument("--env", action="append", default=[], metavar="RMT_X=V",
                        help="A setting for the server (e.g. RMT_PREPARE_DEFAULT_BASE=0 to measure without it).")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="rmt-bench-preview-"))
    subprocess.run([sys.executable, "-m", "rmt_core.cli", "sample", str(work / "sample"), "--per-class",
                    str(args.per_class)], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    fields: list = []
    for class_dir in sorted(p for p in (work / "sample").iterdir() if p.is_dir()):
        for f in sorted(class_dir.iterdir()):
            fields += [("files", (f.name, f.read_bytes(), "image/png")), ("labels", class_dir.name)]
    create_body = multipart(fields)
    probe_file = next(iter(sorted((work / "sample").glob("*/*.png"))))
    probe = multipart([("file", ("probe.png", probe_file.read_bytes(), "image/png"))])

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RMT_")}
    env.update(RMT_DATA_DIR=str(work / "data"), RMT_BROKER_URL="")
    env.update(item.split("=", 1) for item in args.env)
    log = open(work / "serve.log", "wb")
    server = subprocess.Popen([sys.executable, "-m", "rmt_cli", "serve", "--host", "127.0.0.1", "--port",
                               str(port), "--data-dir", str(work / "data")], env=env, cwd=ROOT, stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    runs = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if request(base, "GET", "/readyz")[0] == 200:
                    break
            except OSError:
                pass
            if server.poll() is not None:
                raise SystemExit(f"rmt serve exited: {(work / 'serve.log').read_text()[-2000:]}")
            time.sleep(0.25)
        ready_at = time.time()
        time.sleep(args.settle)  # let the embedded worker finish starting (its start is not what this measures)
        prepared = prepared_after(work / "serve.log", ready_at)
        print(json.dumps({"log": str(work / "serve.log"), "default_base_after_ready_s": prepared}), flush=True)
        for i in range(args.runs):
            r = one_run(base, create_body, probe, args.timeout)
            r["run"] = "cold (first create on a fresh data directory)" if i == 0 else "warm"
            runs.append(r)
            print(json.dumps(r), flush=True)
            time.sleep(2)  # the cancel lands before the next create
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)

    warm = [r for r in runs[1:] if r["first_s"] is not None]
    lines = [
        "",
        "## Instant preview: create -> first classify, create -> head (bench/bench_preview.py)",
        "",
        f"Embedded `rmt serve` (API + one worker on the local SQLite broker), builtin backbone, default config, "
        f"`rmt sample` 5 classes x {args.per_class} images; {platform.machine()}, {os.cpu_count()} CPUs seen, "
        f"{time.strftime('%Y-%m-%d')}. Times from the HTTP 202; the job is cancelled once tuning starts.",
        "",
        "| run | 202 (s) | first classify (s) | answered by | head preview (s) | tuning started (s) |",
        "|---|---|---|---|---|---|",
    ]
    for r in runs:
        lines.append(f"| {r['run']} | {r['create_s']} | {r['first_s']} | {r['first_model']} | "
                     f"{r['head_preview_s'] if r['head_preview_s'] is not None else 'not published (zero-shot validated as well)'} | "
                     f"{r['tuning_started_s']} |")
    if warm:
        med = statistics.median(r["first_s"] for r in warm)
        heads = [r["tuning_started_s"] for r in warm if r["tuning_started_s"] is not None]
        lines += ["", f"Warm median: first classify {med:.2f} s (goal <= {GOAL_FIRST_S} s: "
                      f"{'met' if med <= GOAL_FIRST_S else 'missed'}); head candidate ready by "
                      f"{statistics.median(heads):.2f} s (goal <= {GOAL_HEAD_S} s: "
                      f"{'met' if statistics.median(heads) <= GOAL_HEAD_S else 'missed'})." if heads else ""]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.append:
        with open(args.append, "a") as fh:
            fh.write(text)


if __name__ == "__main__":
    main()
