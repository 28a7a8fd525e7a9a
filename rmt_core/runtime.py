"""Serving without torch: a classifier is a shared base + its mask + its head (and old baked model dirs).

    registry = BaseRegistry(bases_dir)                  # one per process: shares bases between classifiers
    clf = load_classifier(version_dir, bases_dir, registry)
    clf.top_k(clf.run(batch), 5)

A version directory written by ``pipeline.build_classifier`` holds manifest.json (labels, preprocess,
base_id, mask and head file names), the mask file and head.npz; the base (frozen encoder ONNX) lives in
``bases_dir/<base_id>``. The encoder runs as a chain of ONNX Runtime sessions (rmt_core/segments.py):
segments that read no masked weight are built once per base and shared by every classifier on it;
segments that read a masked weight are built per classifier with the mask multiplied in at load, so
inference costs what plain CLIP costs. A classifier whose mask flipped nothing (zero-shot, or a
mask candidate that was not selected) builds no encoder tensors of its own: it runs the shared base.
The head (rmt_core/head.py) runs in numpy. Old directories with a baked model.onnx load as
``OnnxClassifier``.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import io
import json
import logging
import os
import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .numeric import softmax  # noqa: F401  (re-exported: callers import it from here)
from .heap import return_freed_memory
from .preprocess import PreprocessConfig, preprocess_batch, preprocess_image

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
ONNX_FILE = "model.onnx"
LOGITS = "rmt_logits"  # the head's output in a session that runs the head too


def _cuda_probe_session() -> list[str]:
    """The providers a one-node session really gets when CUDA is asked for (ORT falls back to the CPU, with its
    own error line, when the CUDA EP cannot start: no device, missing CUDA/cuDNN libraries, driver too old)."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "cuda_probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    onnx.checker.check_model(model)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), sess_options=options,
                                   providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    return session.get_providers()


@functools.lru_cache(maxsize=1)
def _cuda_usable() -> bool:
    """Whether sessions can run on CUDA here; decided once per process, and a CPU fallback is logged once.

    Needs the CUDA build of ONNX Runtime (onnxruntime-gpu: the GPU API image), the NVIDIA driver's libcuda,
    and a CUDA EP that really starts. CUDA/cuDNN libraries installed as pip wheels (nvidia-*) are loaded from
    site-packages first by ``onnxruntime.preload_dlls`` (ORT >= 1.21), so no LD_LIBRARY_PATH is needed.
    """
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        log.info("ONNX Runtime %s serves on the CPU: this is its CPU build (the GPU API image carries "
                 "onnxruntime-gpu)", ort.__version__)
        return False
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        log.warning("ONNX Runtime serves on the CPU: onnxruntime-gpu is installed but this host has no NVIDIA "
                    "driver (libcuda.so.1 not found; no GPU, or the container was started without one)")
        return False
    if hasattr(ort, "preload_dlls"):
        printed = io.StringIO()
        try:
            with contextlib.redirect_stdout(printed):  # preload_dlls reports missing libraries with print()
                ort.preload_dlls()
        except Exception:  # a failed preload shows up in the probe below; its reason goes to the debug log
            log.debug("onnxruntime.preload_dlls failed", exc_info=True)
        if printed.getvalue().strip():
            log.debug("onnxruntime.preload_dlls: %s", printed.getvalue().strip())
    try:
        got = _cuda_probe_session()
    except Exception as exc:
        got = [f"error: {exc}"]
    if "CUDAExecutionProvider" not in got:
        log.warning("ONNX Runtime serves on the CPU: its CUDA execution provider did not start (%s); see ONNX "
                    "Runtime's error above for the missing library or device", got)
        return False
    log.info("ONNX Runtime %s serves on CUDA", ort.__version__)
    return True


def _providers(providers: str) -> list[str]:
    if providers not in ("auto", "cpu", "cuda"):
        raise ValueError(f"providers={providers!r} must be auto, cpu or cuda")
    wanted = ["CPUExecutionProvider"]
    if providers in ("auto", "cuda") and _cuda_usable():
        wanted.insert(0, "CUDAExecutionProvider")
    return wanted


def inference_device(providers: str = "auto") -> dict:
    """What serving runs on for the ``ort_providers`` setting: {"device": "cuda" | "cpu", "providers": [...]}
    (the execution providers every session gets, in priority order); reported by /readyz."""
    wanted = _providers(providers)
    return {"device": "cuda" if "CUDAExecutionProvider" in wanted else "cpu", "providers": wanted}


def session_options() -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Idle ORT threads spin by default and take the CPU from the server's request decoding between batches.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def make_session(model: Path | str | bytes, providers: str = "auto",
                 options: ort.SessionOptions | None = None) -> ort.InferenceSession:
    """An ORT session on CUDA when it really works, CPU otherwise; ``providers`` is auto | cpu | cuda.

    ``model`` is a path or a serialized ModelProto.
    """
    wanted = _providers(providers)
    options = options or session_options()
    session = ort.InferenceSession(model if isinstance(model, bytes) else str(model), sess_options=options,
                                   providers=wanted)
    # A host without a usable CUDA EP was logged once by _cuda_usable; warn here only when a session that
    # should have got CUDA did not (e.g. the device ran out of memory).
    if "CUDAExecutionProvider" in wanted and "CUDAExecutionProvider" not in session.get_providers():
        log.warning("CUDA was asked for but ONNX Runtime runs on %s", session.get_providers())
    return session


def _read_manifest(model_dir: Path) -> dict:
    manifest_path = model_dir / MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{model_dir} is not a classifier directory (no {MANIFEST})")
    return json.loads(manifest_path.read_text())


class _Classifier:
    """What every served classifier shares around its ``logits``: preprocessing, the batch check, softmax, top-k.
    Subclasses set ``labels`` and ``preprocess_config`` and define ``logits(batch)``."""

    labels: list[str]
    preprocess_config: PreprocessConfig

    @property
    def input_size(self) -> tuple[int, int]:
        return self.preprocess_config.size

    def preprocess(self, img) -> np.ndarray:
        return preprocess_image(img, self.preprocess_config)

    def _checked_batch(self, batch: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if batch.ndim != 4 or batch.shape[1:] != (3, *self.input_size):
            raise ValueError(f"batch has shape {batch.shape}; expected [N, 3, {self.input_size[0]}, {self.input_size[1]}]")
        return batch

    def logits(self, batch: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Preprocessed batch [N,3,H,W] -> class probabilities [N,C]."""
        return softmax(self.logits(batch))

    def predict(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(class probabilities [N,C], outlier scores [N] in [0, 1] or None when the classifier has no
        open-set data: old baked directories and heads built before it existed)."""
        return self.run(batch), None

    def top_k(self, probs: np.ndarray, top_k: int = 5) -> list[list[dict]]:
        k = max(1, min(int(top_k), len(self.labels)))
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        return [[{"label": self.labels[j], "score": float(row[j])} for j in idx] for row, idx in zip(probs, order)]

    def classify(self, images, top_k: int = 5) -> list[list[dict]]:
        return self.top_k(self.run(preprocess_batch(images, self.preprocess_config)), top_k)


class OnnxClassifier(_Classifier):
    """A published classifier: labels + preprocessing from manifest.json, the baked model from model.onnx."""

    def __init__(self, model_dir: Path | str, providers: str = "auto"):
        self.model_dir = Path(model_dir)
        self.manifest = _read_manifest(self.model_dir)
        self.labels: list[str] = list(self.manifest["labels"])
        self.preprocess_config = PreprocessConfig.from_dict(self.manifest["preprocess"])
        self.session = make_session(self.model_dir / ONNX_FILE, providers)
        self._input = self.session.get_inputs()[0].name

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def logits(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self._input: self._checked_batch(batch)})[0]


# ---- base + mask + head --------------------------------------------------------------------------------
from .artifact import LEGACY_MASK_FILE  # noqa: E402  (numpy-only module)

_env_allocator = {"registered": None}


def _register_env_allocator() -> bool:
    """One CPU arena for every session that opts in (a session's own arena would keep its peak activations)."""
    if _env_allocator["registered"] is None:
        try:
            info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
            ort.create_and_register_allocator(info, None)
            _env_allocator["registered"] = True
        except Exception as exc:  # an allocator registered elsewhere in the process is fine too
            log.info("shared ORT allocator not registered (%s); sessions keep their own arenas", exc)
            _env_allocator["registered"] = "already" in str(exc).lower()
    return bool(_env_allocator["registered"])


def import_loading_modules() -> None:
    """Import what loading the first classifier needs beyond ONNX Runtime: the ``onnx`` package (a base's graph
    is read with it), whose import took 0.76 s of a fresh process's 0.85 s first load here (ml_dtypes' extension).
    The API calls this at start so the first classify after a create on a fresh install does not wait for it
    (bench/RESULTS-build.md)."""
    import onnx  # noqa: F401
    from onnx import numpy_helper  # noqa: F401


class _LoadedBase:
    """A base's graph (no weights) and a read-only map of its data file."""

    def __init__(self, info):
        import onnx

        from .base import BASE_DATA, external_layout
        from .segments import value_types

        self.info = info
        self.model = onnx.load(str(info.onnx_path), load_external_data=False)
        self.layout = external_layout(self.model)
        self.data_path = info.path / BASE_DATA
        self.types = value_types(self.model)
        self.input_name = self.model.graph.input[0].name
        self.output_name = self.model.graph.output[0].name

    def array(self, name: str) -> np.ndarray:
        """The base value of an initializer, read from the data file into a new writable array."""
        from onnx import numpy_helper

        if name in self.layout:
            offset, length, dtype, shape = self.layout[name]
            out = np.empty(shape, dtype=dtype)
            with open(self.data_path, "rb") as fh:
                fh.seek(offset)
                if fh.readinto(memoryview(out.reshape(-1).view(np.uint8))) != length:
                    raise ValueError(f"{self.data_path} is truncated (initializer {name})")
            return out
        for t in self.model.graph.initializer:
            if t.name == name:
                return numpy_helper.to_array(t).copy()
        raise KeyError(name)

    def segment_session(self, registry: "BaseRegistry", segment, values: dict[str, np.ndarray] | None = None,
                        head=None, weight_inputs: frozenset[str] = frozenset()):
        """See ``build_segment``; the session alone."""
        return self.build_segment(registry, segment, values, head, weight_inputs)[0]

    def build_segment(self, registry: "BaseRegistry", segment, values: dict[str, np.ndarray] | None = None,
                      head=None, weight_inputs: frozenset[str] = frozenset(), int8: bool = False):
        """An ORT session for ``segment``; large initializers are handed over as OrtValues (no protobuf
        round trip), taken from ``values`` when given (masked tensors) or from the base's data file. With
        ``head`` (a segment that is the whole base, built for one classifier) the head's nodes are appended:
        the session then answers ``LOGITS`` as well as the features, as today's baked model did.
        ``weight_inputs``: initializers that become inputs of the session (the JIT tier feeds each classifier's
        masked weights per call). ``int8``: the segment's MatMul/Gemm weights dynamically quantized
        (rmt_core/quantize.py; the weights then go into the model itself, the head stays float).
        Returns (session, bytes of the weights it was given: ``values``' or, int8, the quantized model's)."""
        import dataclasses

        from onnx import helper, numpy_helper

        from .head import append_to_graph
        from .segments import external_placeholder, segment_model

        values = dict(values or {})
        types = self.types
        if weight_inputs:
            segment = dataclasses.replace(segment, initializers=[n for n in segment.initializers if n not in weight_inputs],
                                          inputs=[*segment.inputs, *[n for n in segment.initializers if n in weight_inputs]])
            types = dict(types)
            for n in weight_inputs:
                dtype, shape = self.layout[n][2], self.layout[n][3]
                types[n] = helper.make_tensor_type_proto(helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), list(shape))
        tensors = {}
        for n in segment.initializers:
            if n in values or n in self.layout:
                if n not in values:
                    values[n] = self.array(n)
                tensors[n] = numpy_helper.from_array(values[n], n) if int8 else external_placeholder(n, values[n])
            else:
                tensors[n] = next(t for t in self.model.graph.initializer if t.name == n)
        model = segment_model(self.model, segment, tensors, types)
        if int8:
            from .quantize import initializer_bytes, quantize_model

            model = quantize_model(model)
            values, weight_bytes = {}, initializer_bytes(model)
        else:
            weight_bytes = sum(v.nbytes for v in values.values())
        if head is not None:
            append_to_graph(model.graph, head, features=self.output_name, output=LOGITS)
            model.graph.output.append(helper.make_value_info(self.output_name, self.types[self.output_name]))
        options = registry.options()
        names = [n for n in segment.initializers if n in values]
        if names:
            options.add_external_initializers(names, [ort.OrtValue.ortvalue_from_numpy(values[n]) for n in names])
        return make_session(model.SerializeToString(), registry.providers, options), weight_bytes


class _Plan:
    """The segments of one base for one set of masked initializers, with the shared segments' sessions."""

    def __init__(self, segments, shared_sessions: dict[int, ort.InferenceSession]):
        self.segments = segments
        self.shared_sessions = shared_sessions
        self.refs = 0
        self.layout: dict | bool | None = None  # rmt_core/serving.py's batch layout; False: rows cannot be split
        # JIT tier (built on first use): own segments as sessions whose masked weights are inputs, the base
        # values of those weights, and per thread the weights last formed (restored and re-zeroed per classifier)
        self.jit_sessions: dict[int, ort.InferenceSession] | None = None
        self.base_values: dict[str, np.ndarray] = {}
        self.formed = threading.local()
        self.lock = threading.Lock()


class BaseRegistry:
    """Per process: loaded bases and the ORT sessions their classifiers share, reference-counted.

    ``acquire`` returns the plan for (base, masked tensors); ``release`` drops it when its last
    classifier goes, except the ``keep_idle`` most recently released plans, kept so that a cache that
    evicts a base's last classifier and loads another one soon does not rebuild the shared sessions.
    Classifiers that mask nothing share one plan: the whole base as one session. ``return_memory`` (for a
    process that serves many classifiers) makes freed blocks >= 1 MiB go back to the OS at once
    (``rmt_core.heap.return_freed_memory``): without it a load leaves ~0.5x its size behind as freed heap.
    It is process-wide, and every large allocation then costs an mmap, so a process that trains with torch
    (the worker's parity check builds a registry too) leaves it off.
    """

    def __init__(self, bases_dir: Path | str, providers: str = "auto", shared_arena: bool = True,
                 shared_min_bytes: int | None = None, load_threads: int | None = None, keep_idle: int = 1,
                 return_memory: bool = False):
        from .segments import SHARED_MIN_BYTES

        self.bases_dir = Path(bases_dir)
        self.providers = providers
        if return_memory:  # a serving process: see rmt_core/heap.py (process-wide, so not in a torch worker)
            return_freed_memory()
        self.shared_arena = shared_arena and _register_env_allocator()
        self.shared_min_bytes = SHARED_MIN_BYTES if shared_min_bytes is None else shared_min_bytes
        self.load_threads = load_threads if load_threads is not None else min(4, os.cpu_count() or 1)
        self._bases: dict[str, _LoadedBase] = {}
        self._plans: dict[tuple[str, frozenset], _Plan] = {}
        self._idle: dict[tuple[str, frozenset], None] = {}  # released plans kept, oldest first
        self.keep_idle = max(0, int(keep_idle))
        self._lock = threading.RLock()

    def options(self) -> ort.SessionOptions:
        options = session_options()
        if self.shared_arena:
            options.add_session_config_entry("session.use_env_allocators", "1")
        return options

    def base(self, base_id: str) -> _LoadedBase:
        from .base import load_base

        with self._lock:
            if base_id not in self._bases:
                self._bases[base_id] = _LoadedBase(load_base(self.bases_dir, base_id))
            return self._bases[base_id]

    def acquire(self, base_id: str, masked: frozenset[str], precision: str = "fp32") -> _Plan:
        """The plan for (base, masked tensors, precision): int8 plans have int8 shared sessions of their own."""
        from .segments import partition

        with self._lock:
            key = (base_id, frozenset(masked), precision)
            self._idle.pop(key, None)
            plan = self._plans.get(key)
            if plan is None:
                base = self.base(base_id)
                segments = partition(base.model.graph, key[1], self.shared_min_bytes)
                shared = {i: base.build_segment(self, seg, int8=precision == "int8")[0]
                          for i, seg in enumerate(segments) if seg.kind == "shared"}
                plan = self._plans[key] = _Plan(segments, shared)
            plan.refs += 1
            return plan

    def jit_sessions(self, base_id: str, plan: _Plan) -> dict[int, ort.InferenceSession]:
        """The plan's own segments built once, their masked weights as inputs (the JIT tier)."""
        with plan.lock:
            if plan.jit_sessions is None:
                base = self.base(base_id)
                sessions = {}
                for i, seg in enumerate(plan.segments):
                    if seg.kind == "own":
                        for n in seg.masked:
                            plan.base_values[n] = base.array(n)
                        sessions[i] = base.segment_session(self, seg, weight_inputs=frozenset(seg.masked))
                plan.jit_sessions = sessions
            return plan.jit_sessions

    def release(self, base_id: str, masked: frozenset[str], precision: str = "fp32") -> None:
        with self._lock:
            key = (base_id, frozenset(masked), precision)
            plan = self._plans.get(key)
            if plan is not None:
                plan.refs -= 1
                if plan.refs <= 0:
                    self._idle[key] = None
                    while len(self._idle) > self.keep_idle:
                        oldest = next(iter(self._idle))
                        del self._idle[oldest], self._plans[oldest]
                        if not any(k[0] == oldest[0] for k in self._plans):
                            self._bases.pop(oldest[0], None)

    def stats(self) -> dict:
        """What is held: bases, plans and their reference counts, shared sessions."""
        with self._lock:
            return {"bases": sorted(self._bases),
                    "plans": [{"base_id": k[0], "masked": len(k[1]), "precision": k[2], "refs": p.refs,
                               "shared_sessions": len(p.shared_sessions), "segments": len(p.segments)}
                              for k, p in self._plans.items()]}


_ORT_TYPES = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(int32)": np.int32,
              "tensor(bool)": np.bool_, "tensor(float16)": np.float16, "tensor(double)": np.float64}

# How a served classifier holds its masked weights: "baked" (multiplied in at load, in sessions of its own:
# today's latency, ~its masked tensors in memory) or "jit" (only the positions its mask drops; the weights are
# formed per call into per-thread buffers and fed to sessions shared by the plan: ~its mask in memory, a load
# in milliseconds once the plan is built). bench/RESULTS-multitenant.md measures both.
SERVING_MODES = ("baked", "jit")

# Batches up to this size run the chain through IO bindings into reused buffers (``_BoundChain``).
BIND_MAX_BATCH = 8


def _aligned_empty(shape: tuple, dtype: np.dtype, align: int = 64) -> np.ndarray:
    """An uninitialised array whose data starts on an ``align``-byte boundary (what ORT's own allocator gives)."""
    dtype = np.dtype(dtype)
    nbytes = max(1, int(np.prod(shape, dtype=np.int64)) * dtype.itemsize)
    raw = np.empty(nbytes + align, np.uint8)
    start = (-raw.ctypes.data) % align
    return raw[start:start + nbytes].view(dtype).reshape(shape)


class _BoundChain:
    """A chain of segment sessions bound once to fixed buffers for one batch shape (CPU only).

    Between segments the chain otherwise hands over fresh ORT outputs, and each session's planned buffers
    are its own: at batch 1 on ViT-B-32 that measured ~6% slower than the whole graph in one session, which
    reuses a few cache-hot buffers. Here every value passed between segments lives in a slot reused call after
    call, slots are shared by values that are never alive together, and each session is bound once
    (``io_binding``), so a call only copies the batch in and the features out. Not thread-safe: one call at a
    time per instance (``ServedClassifier`` keeps a small pool).
    """

    def __init__(self, chain: list[tuple], input_name: str, output_name: str, shapes: dict[str, tuple],
                 last_use: dict[str, int]):
        free: dict[tuple, list[np.ndarray]] = {}
        self.buffers: dict[str, np.ndarray] = {}

        def take(name):
            shape, dtype = shapes[name]
            pool = free.get((shape, dtype))
            self.buffers[name] = pool.pop() if pool else _aligned_empty(shape, dtype)

        take(input_name)
        for i, (seg, _) in enumerate(chain):
            for n in seg.outputs:
                take(n)
            for n in seg.inputs:  # after this segment's outputs: a segment never writes over its own inputs
                if last_use.get(n) == i and n != output_name:
                    free.setdefault(shapes[n], []).append(self.buffers[n])
        self._values = {n: ort.OrtValue.ortvalue_from_numpy(b) for n, b in self.buffers.items()}
        self.bindings = []
        for seg, session in chain:
            binding = session.io_binding()
            for n in seg.inputs:
                binding.bind_ortvalue_input(n, self._values[n])
            for n in seg.outputs:
                binding.bind_ortvalue_output(n, self._values[n])
            self.bindings.append((session, binding))
        self.input, self.output = self.buffers[input_name], self.buffers[output_name]

    @property
    def nbytes(self) -> int:
        return sum({id(b): b.nbytes for b in self.buffers.values()}.values())

    def run(self, batch: np.ndarray) -> np.ndarray:
        np.copyto(self.input, batch)
        for session, binding in self.bindings:
            session.run_with_iobinding(binding)
        return self.output.copy()


class ServedClassifier(_Classifier):
    """A classifier served over a shared base: same interface as OnnxClassifier (labels, run, top_k, ...).

    ``precision="int8"`` serves int8 (rmt_core/quantize.py: every segment quantized, the masked ones baked and
    then quantized; ``mode`` does not apply) when the version's manifest records a passed int8 guard, fp32
    otherwise; ``mode="jit"`` serves jit unless the build's mode parity check (``check_mode_parity``) refused it.
    ``check_guard=False`` ignores both verdicts (the checks themselves). ``self.precision`` and ``self.mode``
    say what is served."""

    def __init__(self, version_dir: Path | str, registry: BaseRegistry, mode: str = "baked",
                 precision: str = "fp32", check_guard: bool = True):
        import weakref

        from .quantize import PRECISIONS, guard_allows

        if mode not in SERVING_MODES:
            raise ValueError(f"serving mode {mode!r} must be one of {', '.join(SERVING_MODES)}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision {precision!r} must be one of {', '.join(PRECISIONS)}")

        from .artifact import load_packed
        from .head import HEAD_FILE, Head

        self.model_dir = Path(version_dir)
        self.manifest = _read_manifest(self.model_dir)
        if not self.manifest.get("base_id"):
            raise ValueError(f"{self.model_dir} names no base (manifest has no base_id)")
        self.labels: list[str] = list(self.manifest["labels"])
        self.preprocess_config = PreprocessConfig.from_dict(self.manifest["preprocess"])
        self.head = Head.load(self.model_dir / self.manifest.get("head_file", HEAD_FILE))
        if self.head.n_classes != len(self.labels):
            raise ValueError(f"head has {self.head.n_classes} classes, manifest {len(self.labels)} labels")
        self.base_id = self.manifest["base_id"]
        base = registry.base(self.base_id)
        self._input, self._output = base.input_name, base.output_name

        flipped: dict[str, tuple[str, bool]] = {}  # initializer -> (mask tensor name, stored transposed)
        packed = None
        mask_file = self.manifest.get("mask_file", LEGACY_MASK_FILE)
        if mask_file and ("mask_file" in self.manifest or (self.model_dir / mask_file).is_file()):
            packed = load_packed(self.model_dir / mask_file)  # named but missing: an error, never "unmasked"
            for name in packed.names:
                if packed.all_kept(name):
                    continue  # nothing flipped: the base tensor serves as it is
                if name not in base.info.maskable:
                    raise ValueError(f"mask {name} has no maskable tensor in base {self.base_id}")
                where = base.info.maskable[name]
                flipped[where["initializer"]] = (name, bool(where["transpose"]))
        self.masked = frozenset(flipped)
        self._registry = registry
        int8 = precision == "int8" and (not check_guard or guard_allows(self.manifest))
        self.precision = "int8" if int8 else "fp32"
        plan = self._plan = registry.acquire(self.base_id, self.masked, self.precision)
        self._release = weakref.finalize(self, registry.release, self.base_id, self.masked, self.precision)

        # A classifier with one session of its own for the whole base (a small backbone: bench/RESULTS-layout.md)
        # runs its head inside it, as today's baked model does: at ~2 ms a call, the numpy head and the first
        # numpy work after ORT returns were +5-10%.
        jit = (mode == "jit" and any(seg.kind == "own" for seg in plan.segments) and not int8
               and (not check_guard or (self.manifest.get(JIT_PARITY_KEY) or {}).get("allowed", True)))
        self.mode = "jit" if jit else "baked"
        whole = len(plan.segments) == 1 and plan.segments[0].kind == "own" and not jit
        self._head_in_session = whole
        self._dropped: dict[str, np.ndarray] = {}  # JIT tier: initializer -> flat indices of its masked-out weights

        def build(seg):
            values = {}
            for n in seg.masked:  # bits unpacked here, in the loader's threads: ~60 ms of a ViT-B-32 load
                mask_name, transposed = flipped[n]
                keep = packed.unpack(mask_name)
                keep = keep.T if transposed else keep
                value = base.array(n)
                if value.shape != keep.shape:
                    raise ValueError(f"mask for {n} has shape {keep.shape}, the base tensor {value.shape}")
                value *= keep  # baked at load: the session computes exactly what plain CLIP computes
                values[n] = value
            head = self.head if whole else None
            session, weight_bytes = base.build_segment(registry, seg, values, head, int8=int8)
            return session, weight_bytes if int8 else sum(v.nbytes for v in values.values())

        own = [i for i, seg in enumerate(plan.segments) if seg.kind == "own"]
        if jit:  # what this classifier holds: the positions of the weights its mask drops (int32), nothing else
            for n, (mask_name, transposed) in flipped.items():
                keep = packed.unpack(mask_name)
                keep = keep.T if transposed else keep
                if keep.shape != tuple(base.layout[n][3]):
                    raise ValueError(f"mask for {n} has shape {keep.shape}, the base tensor {base.layout[n][3]}")
                self._dropped[n] = np.flatnonzero(~keep).astype(np.int32 if keep.size < 2**31 else np.int64)
            sessions = registry.jit_sessions(self.base_id, plan)
            built = {i: (sessions[i], 0) for i in own}
        elif len(own) > 1 and registry.load_threads > 1:  # ORT builds sessions without the GIL
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(min(registry.load_threads, len(own)), thread_name_prefix="rmt-load") as pool:
                built = dict(zip(own, pool.map(build, [plan.segments[i] for i in own])))
        else:
            built = {i: build(plan.segments[i]) for i in own}
        self.own_tensor_bytes = sum(nbytes for _, nbytes in built.values()) + sum(i.nbytes for i in self._dropped.values())
        self._chain: list[tuple] = [(seg, built[i][0] if seg.kind == "own" else plan.shared_sessions[i])
                                    for i, seg in enumerate(plan.segments)]  # (segment, session) in order
        # drop each intermediate once no later segment needs it
        self._last_use = {}
        for i, (seg, _) in enumerate(self._chain):
            for n in seg.inputs:
                self._last_use[n] = i
        self._providers = self._chain[0][1].get_providers()
        self._shapes: dict[tuple, dict] = {}  # batch shape -> every passed value's (shape, dtype), seen once
        self._bound: dict[tuple, list[_BoundChain]] = {}
        self._bound_lock = threading.Lock()
        if plan.layout is None and not whole and not int8 and any(seg.kind == "shared" for seg in plan.segments):
            from .serving import probe_layout

            plan.layout = probe_layout(self) or False  # once per plan, in the loader's thread
            plan.formed.__dict__.clear()  # the JIT weights the probe formed here: a loader thread serves nothing

    def _weights(self, seg) -> dict[str, np.ndarray]:
        """JIT tier: ``seg``'s masked weights formed for this classifier in this thread's buffers (the base value
        with this classifier's dropped positions zeroed; formed again only when another classifier ran in this
        thread since). Empty when baked."""
        if self.mode != "jit" or seg.kind != "own":
            return {}
        formed = self._plan.formed
        if not hasattr(formed, "buffers"):
            formed.buffers, formed.owner = {}, {}
        out = {}
        for n in seg.masked:
            base = self._plan.base_values[n]
            buf = formed.buffers.get(n)
            if buf is None:
                buf = formed.buffers[n] = base.copy()
                formed.owner[n] = None
            dropped = self._dropped.get(n)
            previous = formed.owner[n]
            if previous is not dropped:  # a copy and one scatter: measured 0.6x of restoring + zeroing by index
                np.copyto(buf, base)
                if dropped is not None:
                    buf.reshape(-1)[dropped] = 0
                formed.owner[n] = dropped
            out[n] = buf
        return out

    def run_segment(self, index: int, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Segment ``index`` of this classifier's chain on ``feeds`` (numpy); the JIT tier adds its weights."""
        seg, session = self._chain[index]
        return session.run(seg.outputs, {**feeds, **self._weights(seg)})

    @property
    def batch_group(self):
        """Classifiers with equal groups run the same shared sessions (rmt_core/serving.py mixes their requests in
        one batch); None where nothing is shared (the head runs inside the classifier's one session) and for int8
        (activations are quantized with one scale per batch: another classifier's rows would change its answers)."""
        if self._head_in_session or self.precision == "int8" or not any(seg.kind == "shared" for seg, _ in self._chain):
            return None
        if not self._plan.layout:  # values passed between segments that cannot be split by rows
            return None
        return (id(self._registry), self.base_id, self.masked, self.precision)

    @property
    def batch_layout(self) -> dict:
        """How each value passed between segments depends on the batch (rmt_core/serving.py)."""
        return self._plan.layout  # type: ignore[return-value]

    @property
    def chain(self) -> list[tuple]:
        """(segment, session) in order: the shared segments' sessions are the same objects for every
        classifier of this ``batch_group``."""
        return self._chain

    @property
    def last_use(self) -> dict[str, int]:
        return self._last_use

    @property
    def input_name(self) -> str:
        return self._input

    @property
    def output_name(self) -> str:
        return self._output

    @property
    def resident_bytes(self) -> int:
        """What this classifier holds beyond the shared base: its own baked tensors (ORT keeps them, prepacked,
        in sessions of its own; measured within ~10% of the RSS a load adds: bench/RESULTS-multitenant.md)
        and its head's arrays."""
        head = sum(a.nbytes for a in (self.head.W, self.head.b, self.head.cache_keys, self.head.cache_values,
                                      getattr(self.head, "outlier_keys", None)) if a is not None)
        return int(self.own_tensor_bytes + head)

    def predict(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Preprocessed batch -> (probs [N,C], outlier scores or None): outlier where the head scores them."""
        if self._head_in_session:
            logits, features = self._chain[0][1].run([LOGITS, self._output], {self._input: self._checked_batch(batch)})
        else:
            features = self.features(batch)
            logits = self.head.logits(features)
        scores = getattr(self.head, "outlier_scores", None)
        return softmax(logits), (scores(features) if scores is not None else None)

    @property
    def own_sessions(self) -> int:
        """ORT sessions built for this classifier alone (0 when it runs entirely on shared ones)."""
        return sum(1 for seg, _ in self._chain if seg.kind == "own")

    @property
    def providers(self) -> list[str]:
        return self._providers

    def features(self, batch: np.ndarray) -> np.ndarray:
        """Preprocessed batch [N,3,H,W] -> raw image features [N,D] (the base's output)."""
        batch = self._checked_batch(batch)
        if len(self._chain) == 1:
            seg, session = self._chain[0]
            return session.run([self._output], {self._input: batch, **self._weights(seg)})[0]
        bindable = (batch.shape[0] <= BIND_MAX_BATCH and self._providers[0] == "CPUExecutionProvider"
                    and self.mode == "baked")
        if bindable and batch.shape in self._shapes:
            return self._run_bound(batch)
        # OrtValues between segments: on CUDA the activations stay on the device from one segment to the next
        env = {self._input: ort.OrtValue.ortvalue_from_numpy(batch)}
        shapes = {self._input: (batch.shape, batch.dtype)}
        for i, (seg, session) in enumerate(self._chain):
            feeds = {n: env[n] for n in seg.inputs}
            for n, value in self._weights(seg).items():
                feeds[n] = ort.OrtValue.ortvalue_from_numpy(value)
            outs = session.run_with_ort_values(seg.outputs, feeds)
            env.update(zip(seg.outputs, outs))
            for n, v in zip(seg.outputs, outs) if bindable else ():
                dtype = _ORT_TYPES.get(v.data_type())
                if dtype is None:  # a type the bound path does not allocate: this shape keeps the plain path
                    bindable = False
                    break
                shapes[n] = (tuple(v.shape()), np.dtype(dtype))
            for n in seg.inputs:
                if self._last_use[n] == i and n != self._output:
                    env.pop(n, None)
        if bindable:
            self._shapes[batch.shape] = shapes  # the next call of this shape runs bound
        return env[self._output].numpy()

    def _run_bound(self, batch: np.ndarray) -> np.ndarray:
        """``batch`` through a bound buffer set of its shape, taken from the pool (or made) and given back."""
        with self._bound_lock:
            idle = self._bound.get(batch.shape)
            bound = idle.pop() if idle else None
        if bound is None:
            bound = _BoundChain(self._chain, self._input, self._output, self._shapes[batch.shape], self._last_use)
        try:
            return bound.run(batch)
        finally:
            with self._bound_lock:
                idle = self._bound.setdefault(batch.shape, [])
                if len(idle) < 2:  # a burst of concurrent calls leaves at most two sets per shape behind
                    idle.append(bound)

    def logits(self, batch: np.ndarray) -> np.ndarray:
        if self._head_in_session:
            return self._chain[0][1].run([LOGITS], {self._input: self._checked_batch(batch)})[0]
        return self.head.logits(self.features(batch))

    @property
    def registry(self) -> BaseRegistry:
        """The registry this classifier's base sessions come from (another mode or precision of the same version
        loads on it without loading the base again)."""
        return self._registry

    def close(self) -> None:
        """Give the shared sessions back to the registry now (otherwise when this object is collected)."""
        self._chain = []
        with self._bound_lock:
            self._bound.clear()
        self._release()


JIT_PARITY_KEY = "jit_parity"  # manifest: the build's check that the jit tier answers what baked answers
JIT_PARITY_ATOL = 1e-4  # every fp32 mode's class probabilities vs the baked fp32 classifier's (issue 18)


@contextlib.contextmanager
def given_or_loaded(given, load):
    """``given`` as it is (its caller keeps and closes it), or ``load()``'s classifier, closed on exit: a check
    called alone loads what it serves; a build running several checks loads the version once and passes it in."""
    if given is not None:
        yield given
        return
    loaded = load()
    try:
        yield loaded
    finally:
        loaded.close()


def check_mode_parity(version_dir: Path | str, bases_dir: Path | str, images: np.ndarray,
                      atol: float = JIT_PARITY_ATOL, baked: ServedClassifier | None = None) -> dict | None:
    """Serve ``version_dir`` baked and jit (both fp32) on ``images`` (preprocessed [N,3,H,W]), one image
    alone (the bound small-batch chain) and all of them at once, and say whether the jit tier may serve it:
    {"max_abs_dp", "atol", "n", "allowed"}, the record the build stores (``JIT_PARITY_KEY``); a version
    whose record says not allowed is served baked in every mode. None when the version masks nothing (jit
    then serves the shared base exactly as baked does). ``baked``: the version already loaded baked (the caller
    keeps and closes it); otherwise it is loaded here."""
    images = np.ascontiguousarray(images, dtype=np.float32)
    if images.ndim != 4 or len(images) == 0:
        raise ValueError(f"mode parity needs images [N,3,H,W] with N >= 1; got shape {images.shape}")
    with given_or_loaded(baked, lambda: ServedClassifier(
            version_dir, BaseRegistry(bases_dir, "cpu", shared_arena=False), "baked")) as baked:
        if not baked.masked:
            return None
        jit = ServedClassifier(version_dir, baked.registry, "jit", check_guard=False)
        try:
            dp = max(float(np.abs(jit.run(images[:1]) - baked.run(images[:1])).max()),
                     float(np.abs(jit.run(images) - baked.run(images)).max()))
        finally:
            jit.close()
    return {"max_abs_dp": dp, "atol": atol, "n": int(len(images)), "allowed": bool(dp <= atol)}


def load_classifier(version_dir: Path | str, bases_dir: Path | str | None = None,
                    registry: BaseRegistry | None = None, providers: str = "auto", mode: str = "baked",
                    precision: str = "fp32"):
    """The classifier in ``version_dir``: base + mask + head, or an old baked model.onnx directory.

    Pass one ``registry`` per process so classifiers on the same base share it. ``precision="int8"`` serves
    int8 where the version's int8 guard passed (``ServedClassifier``), fp32 elsewhere (old model.onnx too).
    """
    version_dir = Path(version_dir)
    manifest = _read_manifest(version_dir)
    if not manifest.get("base_id"):
        if (version_dir / ONNX_FILE).is_file():
            return OnnxClassifier(version_dir, providers=registry.providers if registry else providers)
        raise FileNotFoundError(f"{version_dir} has neither a base_id nor a {ONNX_FILE}")
    if registry is None:
        if bases_dir is None:
            raise ValueError("a base+mask+head classifier needs bases_dir (or a BaseRegistry)")
        registry = BaseRegistry(bases_dir, providers)
    elif bases_dir is not None and Path(bases_dir) != registry.bases_dir:
        raise ValueError(f"bases_dir {bases_dir} is not the registry's {registry.bases_dir}")
    return ServedClassifier(version_dir, registry, mode, precision)


def default_bases_dir(version_dir: Path | str) -> Path:
    """Where a version's base lives when nobody says: ``bases`` beside it (``rmt tune --out runs/clf`` puts
    it in runs/bases), or the blob store's ``bases`` (versions/<id> and bases/<id> are siblings there)."""
    version_dir = Path(version_dir).resolve()
    for candidate in (version_dir.parent / "bases", version_dir.parent.parent / "bases"):
        if candidate.is_dir():
            return candidate
    return version_dir.parent / "bases"
