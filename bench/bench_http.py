"""HTTP serving benchmark: `rmt serve` vs raw ONNX Runtime on the same model, in the same run.

Measures, on a ViT-B-32-sized classifier (open_clip ViT-B-32 architecture, random init: serving cost
does not depend on the weights' values):
  1. throughput of 16 concurrent HTTP clients posting one 224x224 JPEG each vs raw ORT on batches of 32
     of already-preprocessed images (the ceiling micro-batching tries to reach);
  2. single-request latency p50 over HTTP vs raw ORT batch-size-1 p50;
  3. resident memory of the server process serving 20 such classifiers through the LRU cache.

    .venv/bin/python bench/bench_http.py [--seconds 20] [--clients 16] [--classifiers 20] [--cache-size 8]

Writes bench/RESULTS-service.md (and prints it). The model is exported once into --work (default
/tmp/rmt-bench-http) and reused. The HTTP client is deliberately cheap (pre-encoded body, http.client,
keep-alive) because it shares the CPU with the server.
"""
from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rmt_core.runtime import OnnxClassifier  # noqa: E402
from rmt_core.artifact import atomic_write_bytes  # noqa: E402
from bench.results import cpu_model  # noqa: E402
from rmt_service.migrate import prepare  # noqa: E402
from rmt_service.settings import Settings  # noqa: E402
from rmt_service.store import Sample, Store  # noqa: E402

LABELS = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
BOUNDARY = "rmtbenchboundary"


def build_model(work: Path) -> Path:
    """A ViT-B-32 classifier directory (manifest.json + model.onnx), exported once."""
    model_dir = work / "vit-b-32"
    if (model_dir / "manifest.json").is_file():
        return model_dir
    import torch

    from rmt_core.backbones import encode_class_texts, load_backbone
    from rmt_core.export import ClassifierHead, export_onnx

    tmp = work / "vit-b-32.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    started = time.monotonic()
    backbone = load_backbone("ViT-B-32", None, device="cpu", seed=0)
    with torch.no_grad():
        text = encode_class_texts(backbone, LABELS, "a photo of a {}.")
    head = ClassifierHead(backbone.model.visual, text, float(backbone.model.logit_scale.exp()))
    export_onnx(head, tmp / "model.onnx")
    manifest = {"labels": LABELS, "backbone": "ViT-B-32", "pretrained": None, "method": "r-amt",
                "config": {"backbone": "ViT-B-32", "method": "r-amt"}, "preprocess": backbone.preprocess,
                "sparsity": 0.0, "mask_bytes": 0, "onnx_bytes": (tmp / "model.onnx").stat().st_size,
                "parity_max_abs_diff": None, "validation": None, "warnings": ["benchmark model (random init)"]}
    atomic_write_bytes(tmp / "manifest.json", json.dumps(manifest, indent=1).encode())
    tmp.rename(model_dir)
    print(f"exported ViT-B-32 classifier in {time.monotonic() - started:.0f}s", flush=True)
    return model_dir


def populate(data_dir: Path, model_dir: Path, n: int, layout: str = "base") -> list[str]:
    """n published classifiers in a fresh store. ``layout="base"`` (what the service publishes): one shared
    ViT-B-32 base and per classifier an r-amt mask (~5% of the attention weights masked, i.i.d.) + head;
    ``"baked"``: today's-before-the-layout model.onnx per classifier (hard links on disk, each loads as its own
    ORT session)."""
    shutil.rmtree(data_dir, ignore_errors=True)
    settings = Settings(_env_file=None, data_dir=data_dir)
    prepare(settings)
    store = Store(settings)
    ids = []
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, "PNG")
    if layout == "base":
        from rmt_core.backbones import encode_class_texts, load_backbone
        from rmt_core.base import ensure_base
        from rmt_core.head import Head
        from rmt_core.masking import target_names

        backbone = load_backbone("ViT-B-32", None, device="cpu", seed=0)
        base = ensure_base(backbone, store.bases_dir)
        text = encode_class_texts(backbone, LABELS, "a photo of a {}.").numpy()
        head = Head.zero_shot(text, float(backbone.model.logit_scale.detach().exp()))
        params = dict(backbone.model.visual.named_parameters())
        names = target_names(backbone.model.visual, "r-amt")
    for i in range(n):
        record, job = store.create_classifier("default", f"bench-{i}", [Sample(png.getvalue(), "a", ".png"),
                                                                          Sample(png.getvalue(), "b", ".png")], {})
        build = store.new_build_dir(record.classifier_id)
        if layout == "base":
            from rmt_core.artifact import write_version_files

            rng = np.random.default_rng(i)
            bits = {f"visual.{k}": rng.random(tuple(params[k].shape)) > 0.05 for k in names}
            fields = write_version_files(build, base_id=base.base_id, head=head, masks=bits,
                                         meta={"method": "r-amt"})
            manifest = {**json.loads((model_dir / "manifest.json").read_text()), **fields}
            atomic_write_bytes(build / "manifest.json", json.dumps(manifest, indent=1).encode())
        else:
            for name in ("model.onnx", "manifest.json"):
                os.link(model_dir / name, build / name)
        store.claim(job.job_id, "bench")
        store.publish_version(record.classifier_id, build, job_id=job.job_id, owner="bench")
        ids.append(record.classifier_id)
    return ids


def jpeg_224(seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, (224, 224, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def multipart(image: bytes) -> bytes:
    return (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.jpg\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n").encode() + image + f"\r\n--{BOUNDARY}--\r\n".encode()


class Client:
    def __init__(self, port: int):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

    def classify(self, classifier_id: str, body: bytes) -> float:
        started = time.perf_counter()
        self.conn.request("POST", f"/v1/classifiers/{classifier_id}/classify?top_k=1", body=body,
                          headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})
        response = self.conn.getresponse()
        payload = response.read()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {payload[:300]!r}")
        return time.perf_counter() - started


def rss_mb(pid: int) -> tuple[float, float]:
    """(current, peak) resident set of a process, MiB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) / 1024
    return values["VmRSS"], values["VmHWM"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(data_dir: Path, port: int, cache_size: int, log_path: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RMT_")}
    env.update(RMT_CLASSIFIER_CACHE_SIZE=str(cache_size), RMT_ORT_PROVIDERS=os.environ.get("RMT_ORT_PROVIDERS", "auto"))
    proc = subprocess.Popen([sys.executable, "-m", "rmt_cli", "serve", "--port", str(port), "--data-dir",
                             str(data_dir), "--worker", "no", "--log-level", "warning"], env=env, cwd=ROOT,
                            stdout=open(log_path, "wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            conn.request("GET", "/healthz")
            if conn.getresponse().status == 200:
                return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"server did not start:\n{log_path.read_text()[-2000:]}")


class RawOrt:
    """The reference: ONNX Runtime on the same model file, fed already-preprocessed tensors."""

    def __init__(self, model_dir: Path, image: bytes):
        self.clf = OnnxClassifier(model_dir, providers=os.environ.get("RMT_ORT_PROVIDERS", "auto"))
        x = self.clf.preprocess(Image.open(io.BytesIO(image)).convert("RGB"))
        self.batch = np.stack([x] * 32)
        self.clf.run(self.batch)
        self.clf.run(self.batch[:1])

    def throughput(self, seconds: float) -> float:
        n, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            self.clf.run(self.batch)
            n += len(self.batch)
        return n / (time.perf_counter() - started)

    def bs1(self) -> float:
        started = time.perf_counter()
        self.clf.run(self.batch[:1])
        return time.perf_counter() - started


def http_throughput(port: int, classifier_id: str, body: bytes, clients: int, seconds: float) -> dict:
    """Completions per second in the steady state: the first quarter of the run (ramp-up) is not counted,
    and requests still in flight at the end do not bias the count (with 16 clients and second-long
    latencies, counting from t=0 would understate throughput by ~10%)."""
    Client(port).classify(classifier_id, body)  # load the session
    stop = threading.Event()
    done: list[list[tuple[float, float]]] = [[] for _ in range(clients)]  # (finished_at, latency)
    errors: list[str] = []

    def run(i: int) -> None:
        client = Client(port)
        while not stop.is_set():
            try:
                latency = client.classify(classifier_id, body)
                done[i].append((time.perf_counter(), latency))
            except Exception as exc:  # report, do not hide
                errors.append(repr(exc))
                return

    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    window_start = started + seconds / 4
    time.sleep(seconds)
    window_end = time.perf_counter()
    stop.set()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{len(errors)} client errors, first: {errors[0]}")
    in_window = sorted(lat for lst in done for t, lat in lst if window_start <= t <= window_end)
    return {"throughput": len(in_window) / (window_end - window_start), "requests": len(in_window),
            "throughput_aligned": burst_aligned_rate(sorted(t for lst in done for t, _ in lst
                                                            if window_start <= t <= window_end)),
            "p50_ms": 1000 * in_window[len(in_window) // 2], "p99_ms": 1000 * in_window[int(len(in_window) * 0.99)]}


def burst_aligned_rate(finished: list[float], gap_s: float = 0.02) -> float:
    """Completions per second between the end of the first burst and the end of the last one in the window.

    A micro-batch's requests complete together (8 at a time here, ~0.3 s apart), so counting completions in a
    fixed window moves by a whole batch with the window's phase: +-8 of ~260 requests, about +-0.03 on the
    ratio. Completions closer than ``gap_s`` form a burst; the rate is taken from the end of the first burst
    to the end of the last, which holds whole batches only."""
    ends = [t for t, nxt in zip(finished, finished[1:] + [float("inf")]) if nxt - t > gap_s]
    if len(ends) < 2:
        return float("nan")
    after_first = sum(1 for t in finished if ends[0] < t <= ends[-1])
    return after_first / (ends[-1] - ends[0])


def latencies(port: int, classifier_id: str, body: bytes, raw: RawOrt, n: int) -> tuple[float, float]:
    """p50 of one HTTP request and of one raw bs1 run, sampled alternately so both see the same load."""
    client = Client(port)
    for _ in range(3):
        client.classify(classifier_id, body)
    http_lat, raw_lat = [], []
    for _ in range(n):
        http_lat.append(client.classify(classifier_id, body))
        raw_lat.append(raw.bs1())
    return 1000 * statistics.median(http_lat), 1000 * statistics.median(raw_lat)


def batch_sizes(port: int) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    count = total = 0.0
    for line in text.splitlines():
        if line.startswith("rmt_classify_batch_size_count"):
            count = float(line.split()[-1])
        elif line.startswith("rmt_classify_batch_size_sum"):
            total = float(line.split()[-1])
    return f"{total / count:.1f}" if count else "n/a"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/rmt-bench-http"))
    parser.add_argument("--seconds", type=float, default=45.0, help="Total throughput time per side.")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--classifiers", type=int, default=20)
    parser.add_argument("--cache-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="Alternating raw/HTTP throughput rounds.")
    parser.add_argument("--latency-samples", type=int, default=40)
    parser.add_argument("--layout", choices=["base", "baked"], default="base",
                        help="what the server serves: base + mask + head versions (the service's layout) or "
                             "a baked model.onnx per classifier (before it); the reference is always the baked "
                             "model in raw ONNX Runtime")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "RESULTS-service.md")
    args = parser.parse_args(argv)

    args.work.mkdir(parents=True, exist_ok=True)
    model_dir = build_model(args.work)
    ids = populate(args.work / "data", model_dir, args.classifiers, args.layout)
    body = multipart(jpeg_224())
    port = free_port()
    server = start_server(args.work / "data", port, args.cache_size, args.work / "server.log")
    try:
        rss_idle = rss_mb(server.pid)[0]
        raw = RawOrt(model_dir, jpeg_224())
        # Alternate raw and HTTP rounds: the machine is shared, and load that varies over minutes
        # must not favour whichever was measured second.
        raw_tp, http_runs = [], []
        for r in range(args.rounds):
            raw_tp.append(raw.throughput(args.seconds / args.rounds))
            http_runs.append(http_throughput(port, ids[0], body, args.clients, args.seconds / args.rounds))
            print(f"round {r + 1}: raw ORT {raw_tp[-1]:.2f} img/s, HTTP {http_runs[-1]['throughput']:.2f} img/s",
                  flush=True)
        loaded = sorted(http_runs, key=lambda x: x["throughput"])[len(http_runs) // 2]
        try:
            spinning = raw.clf.session.get_session_options().get_session_config_entry(
                "session.intra_op.allow_spinning")
        except Exception:  # ORT raises when the entry was never set: the default (spinning) applies
            spinning = "1"
        raw_result = {"throughput": statistics.median(raw_tp), "providers": raw.clf.providers,
                      "spinning": "off" if spinning == "0" else "on (ORT default)"}
        mean_batch = batch_sizes(port)
        single, raw_result["bs1_p50_ms"] = latencies(port, ids[0], body, raw, args.latency_samples)
        raw = raw_result
        print(f"single request p50 {single:.1f} ms, raw bs1 p50 {raw['bs1_p50_ms']:.1f} ms", flush=True)
        print(f"LRU over {len(ids)} classifiers ...", flush=True)
        client = Client(port)
        for _ in range(2):
            for cid in ids:
                client.classify(cid, body)
        rss_now, rss_peak = rss_mb(server.pid)
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(30)

    onnx_mb = (model_dir / "model.onnx").stat().st_size / 2**20
    ratio_tp = loaded["throughput"] / raw["throughput"]
    aligned = statistics.median(x["throughput_aligned"] for x in http_runs)
    # each HTTP round against the raw round just before it: the machine's speed drifts between rounds (raw
    # rounds of one run differed by up to 8% here), and a ratio of medians mixes rounds minutes apart
    paired = [x["throughput_aligned"] / r for x, r in zip(http_runs, raw_tp)]
    ratio_aligned = statistics.median(paired)
    ratio_lat = single / raw["bs1_p50_ms"]
    rows = [
        ("HTTP classify throughput, 16 clients (img/s)", f"{loaded['throughput']:.1f}",
         f"raw ORT batched (bs 32): {raw['throughput']:.1f}", f"{ratio_tp:.2f}", ">= 0.90",
         "pass" if ratio_tp >= 0.90 else "MISS"),
        ("the same, each round's completions counted from its first batch's end to its last's, against the raw "
         "round before it (median of the rounds' ratios)", f"{aligned:.1f}",
         f"raw rounds {', '.join(f'{x:.1f}' for x in raw_tp)}", f"{ratio_aligned:.2f} "
         f"({', '.join(f'{x:.2f}' for x in paired)})", ">= 0.90", "pass" if ratio_aligned >= 0.90 else "MISS"),
        ("single request p50 (ms)", f"{single:.1f}", f"raw ORT bs1 p50: {raw['bs1_p50_ms']:.1f}",
         f"{ratio_lat:.2f}", "<= 1.15", "pass" if ratio_lat <= 1.15 else "MISS"),
        (f"server RSS after serving {len(ids)} classifiers (MiB)", f"{rss_now:.0f} (peak {rss_peak:.0f})",
         f"cache size {args.cache_size}, " + (f"model.onnx {onnx_mb:.0f} MiB each" if args.layout == "baked" else
                                               "base + mask + head each (r-amt, 5% masked)"), "", "<= 4096",
         "pass" if rss_peak <= 4096 else "MISS"),
    ]
    cpu = f"{platform.machine()}, {cpu_model()}"
    lines = [
        "# Service benchmark (bench/bench_http.py)",
        "",
        f"Machine: {os.cpu_count()} CPU cores ({cpu}), ORT providers {raw['providers']}, intra-op spinning "
        f"{raw['spinning']}; "
        f"{time.strftime('%Y-%m-%d')}. Model: open_clip ViT-B-32 image tower + 10-class head "
        f"({onnx_mb:.0f} MiB ONNX, random init); the server serves "
        + ("a baked model.onnx per classifier" if args.layout == "baked" else
           "base + mask + head versions (one shared base, an r-amt mask with 5% of the attention weights masked "
           "and a head per classifier)")
        + ". The reference is the baked model in raw ONNX Runtime. Requests: one 224x224 JPEG each, `top_k=1`, "
        f"throughput: median of {args.rounds} alternating raw/HTTP rounds of {args.seconds / args.rounds:.0f} s; "
        f"latency: {args.latency_samples} alternating samples. Clients and server share the machine (and, "
        "while this ran, other jobs shared it too).",
        "",
        "| measure | service | reference | ratio | goal | |",
        "|---|---|---|---|---|---|",
        *[f"| {' | '.join(row)} |" for row in rows],
        "",
        f"Raw ORT rounds {', '.join(f'{x:.2f}' for x in raw_tp)} img/s; HTTP rounds "
        f"{', '.join(f'{run_tp:.2f}' for run_tp in (x['throughput'] for x in http_runs))} img/s (burst-aligned: "
        f"{', '.join(f'{x:.2f}' for x in (r['throughput_aligned'] for r in http_runs))}). "
        f"Median HTTP round (steady-state window, last 3/4 of it): {loaded['requests']} requests, latency p50 {loaded['p50_ms']:.0f} ms / p99 "
        f"{loaded['p99_ms']:.0f} ms, mean ORT batch {mean_batch} images (micro-batching). Server RSS idle "
        f"{rss_idle:.0f} MiB.",
        "",
        "The HTTP figure includes JPEG decoding, preprocessing, multipart parsing and JSON; the raw ORT "
        "figure is `session.run` on already-preprocessed tensors, so the ratio is the whole serving overhead.",
        "",
        f"Reproduce: `.venv/bin/python bench/bench_http.py --seconds {args.seconds:.0f} --rounds {args.rounds} "
        f"--clients {args.clients} --classifiers {args.classifiers} --cache-size {args.cache_size} "
        f"--layout {args.layout}`",
        "",
    ]
    text = "\n".join(lines)
    args.out.write_text(text)
    print(text)
    (args.work / "results.json").write_text(json.dumps({"raw": raw, "http": loaded, "single_p50_ms": single,
                                                        "ratio_paired_aligned": ratio_aligned, "paired": paired,
                                                        "rss_mb": rss_now, "rss_peak_mb": rss_peak}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
