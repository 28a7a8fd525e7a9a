"""Cut a base graph into segments: the ones that read masked weights (per classifier) and the rest (shared).

Why: ONNX Runtime prepacks every constant MatMul weight into a private copy per session, so sessions
that share initializers (``SessionOptions.add_initializer``) still hold a full prepacked copy each
(bench/RESULTS-layout.md); turning prepacking off costs ~1.4x latency at batch 1. So the encoder runs
as a chain of sessions: segments that read no masked weight are built once per base and shared by every
classifier (prepacked once); segments that read a masked weight are built per classifier with the mask
multiplied in (prepacked, their own). The node set and the kernels are exactly the base's; a cut only
costs one extra ``run`` call and passes the live activations along.

Segments run in order; each takes named tensors produced by the graph input or earlier segments and
returns the ones later segments (or the graph output) need.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# A stretch between masked weights gets its own shared session only when it holds this many weight bytes:
# every segment costs one more ``run`` (~50 us), which a small backbone's whole block does not outweigh
# (rmt-world-vit: 2 MB of MLP per block, bs1 1.33x slower split; ViT-B: 19 MB per block, 0.99x).
SHARED_MIN_BYTES = 8 << 20


@dataclass
class Segment:
    kind: str                 # "own": reads masked initializers; "shared": the same for every classifier
    nodes: list               # NodeProto, in graph order (Constant nodes copied into each consumer)
    initializers: list[str]
    inputs: list[str]
    outputs: list[str]
    masked: list[str] = field(default_factory=list)


def _has_subgraph(node) -> bool:
    from onnx import AttributeProto

    return any(a.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS) for a in node.attribute)


def _tensor_bytes(t) -> int:
    from onnx import helper

    return int(np.prod(t.dims, dtype=np.int64)) * np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize


def _constant_nodes(graph, inits: dict) -> dict[str, tuple]:
    """Nodes that compute a value from initializers and constants only (Constant, and e.g. the Identity that
    torch's exporter writes for a parameter equal to another one): output name -> (node, the initializers
    it reads, directly or through other such nodes). They are copied into every segment that reads them,
    so a constant never crosses a segment boundary as a runtime input (ORT folds it in each session)."""
    const: dict[str, tuple] = {}
    for node in graph.node:
        if _has_subgraph(node) or not node.output:
            continue
        inputs = [x for x in node.input if x]
        if all(x in inits or x in const for x in inputs):
            deps = frozenset().union(*[const[x][1] if x in const else {x} for x in inputs])
            for out in node.output:
                if out:
                    const[out] = (node, deps)
    return const


def partition(graph, masked: set[str] | frozenset[str], shared_min_bytes: int = SHARED_MIN_BYTES) -> list[Segment]:
    """Segments of ``graph`` (a GraphProto, data not needed) for a classifier that masks ``masked`` initializers.

    With nothing masked there is one shared segment (the whole base).
    """
    inits = {t.name: t for t in graph.initializer}
    unknown = set(masked) - set(inits)
    if unknown:
        raise ValueError(f"masked tensors are not initializers of the base: {sorted(unknown)[:5]}")
    const = _constant_nodes(graph, inits)
    const_ids = {id(node) for node, _ in const.values()}
    body = [n for n in graph.node if id(n) not in const_ids]

    def reads(node) -> set[str]:
        """The initializers a body node reads, directly or through constant nodes."""
        out: set[str] = set()
        for x in node.input:
            if x in inits:
                out.add(x)
            elif x in const:
                out |= const[x][1]
        return out

    if any(_has_subgraph(n) for n in body):
        # control flow would need its outer-scope values traced; keep such a base whole (correct, not shared)
        runs = [["own" if masked else "shared", body, 0]]
    else:
        runs = []
        for node in body:
            weights = reads(node)
            kind = "own" if weights & set(masked) else "shared"
            weight = sum(_tensor_bytes(inits[i]) for i in weights if i not in masked)
            if runs and runs[-1][0] == kind:
                runs[-1][1].append(node)
                runs[-1][2] += weight
            else:
                runs.append([kind, [node], weight])
        # a short stretch without masked weights is merged into the own segment next to it
        for run in runs:
            if run[0] == "shared" and run[2] < shared_min_bytes and len(runs) > 1:
                run[0] = "own"
        merged = []
        for run in runs:
            if merged and merged[-1][0] == run[0]:
                merged[-1][1].extend(run[1])
            else:
                merged.append([run[0], list(run[1]), 0])
        runs = merged

    graph_outputs = {o.name for o in graph.output}
    consumed_after: list[set[str]] = [set() for _ in runs]
    later: set[str] = set(graph_outputs)
    for i in range(len(runs) - 1, -1, -1):
        consumed_after[i] = set(later)
        later |= {x for n in runs[i][1] for x in n.input if x}
    order = {id(n): i for i, n in enumerate(graph.node)}
    segments = []
    for i, (kind, nodes, _) in enumerate(runs):
        produced = {o for n in nodes for o in n.output if o}
        const_nodes: dict[int, object] = {}
        init_names, inputs = [], []
        pending = [x for n in nodes for x in n.input if x]
        seen: set[str] = set()
        while pending:
            name = pending.pop(0)
            if name in seen or name in produced:
                continue
            seen.add(name)
            if name in inits:
                init_names.append(name)
            elif name in const:
                node = const[name][0]
                if id(node) not in const_nodes:
                    const_nodes[id(node)] = node
                    pending.extend(x for x in node.input if x)
            else:
                inputs.append(name)
        outputs = [o for n in nodes for o in n.output if o and o in consumed_after[i] and o not in const]
        segments.append(Segment(kind=kind, nodes=sorted(const_nodes.values(), key=lambda n: order[id(n)]) + nodes,
                                initializers=init_names, inputs=inputs,
                                outputs=list(dict.fromkeys(outputs)),
                                masked=[n for n in init_names if n in masked]))
    return segments


def external_placeholder(name: str, array: np.ndarray):
    """A TensorProto that names ``array``'s type and shape but holds no data: the session is given the
    values (``SessionOptions.add_external_initializers``), so they are never serialized and parsed."""
    from onnx import TensorProto, helper

    t = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype), dims=list(array.shape))
    t.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "supplied-at-load"), ("offset", "0"), ("length", str(array.nbytes))):
        entry = t.external_data.add()
        entry.key, entry.value = key, value
    return t


def segment_model(base_model, segment: Segment, tensors: dict, value_types: dict):
    """A ModelProto for ``segment``; ``tensors`` maps each of its initializer names to a TensorProto
    (with data, or an ``external_placeholder``). ``value_types`` (from ``value_types``) gives each input and
    output its element type and, where the base's shape inference knew it, its shape: ORT needs the shapes to
    fold shape arithmetic and to fuse as it does in the whole graph (e.g. MatMul + bias + Gelu -> BiasGelu)."""
    from onnx import helper

    def info(name):
        t = value_types[name]
        if isinstance(t, int):
            return helper.make_tensor_value_info(name, t, None)
        return helper.make_value_info(name, t)

    graph = helper.make_graph(
        segment.nodes, f"{base_model.graph.name}-segment",
        [info(n) for n in segment.inputs], [info(n) for n in segment.outputs],
        initializer=[tensors[n] for n in segment.initializers])
    return helper.make_model(graph, opset_imports=list(base_model.opset_import), ir_version=base_model.ir_version,
                             producer_name="rmt_core.segments")


def value_types(model) -> dict:
    """The type of every value in the graph: a TypeProto with the element type and the shape shape inference
    found (symbolic where it depends on the batch) for graph inputs/outputs and intermediates; the element type
    alone (an int) for initializers and Constant outputs, which never cross a segment boundary."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    types: dict = {}
    for t in model.graph.initializer:
        types[t.name] = t.data_type
    for n in model.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    types[n.output[0]] = a.t.data_type
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        types[vi.name] = vi.type
    return types
