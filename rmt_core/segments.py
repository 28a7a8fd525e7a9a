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


def partition(graph, masked: set[str] | frozenset[str], shared_min_bytes: int = SHARED_MIN_BYTES) -> list[Segment]:
    """Segments of ``graph`` (a GraphProto, data not needed) for a classifier that masks ``masked`` initializers.

    With nothing masked there is one shared segment (the whole base).
    """
    inits = {t.name: t for t in graph.initializer}
    unknown = set(masked) - set(inits)
    if unknown:
        raise ValueError(f"masked tensors are not initializers of the base: {sorted(unknown)[:5]}")
    consts = {n.output[0]: n for n in graph.node if n.op_type == "Constant"}
    body = [n for n in graph.node if n.op_type != "Constant"]
    if any(_has_subgraph(n) for n in body):
        # control flow would need its outer-scope values traced; keep such a base whole (correct, not shared)
        runs = [["own" if masked else "shared", body, 0]]
    else:
        runs = []
        for node in body:
            kind = "own" if any(i in masked for i in node.input) else "shared"
            weight = sum(_tensor_bytes(inits[i]) for i in node.input if i in inits and i not in masked)
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
    segments = []
    for i, (kind, nodes, _) in enumerate(runs):
        produced = {o for n in nodes for o in n.output if o}
        used = [x for n in nodes for x in n.input if x]
        const_nodes, init_names, inputs = [], [], []
        for name in dict.fromkeys(used):
            if name in produced:
                continue
            if name in inits:
                init_names.append(name)
            elif name in consts:
                const_nodes.append(consts[name])
            else:
                inputs.append(name)
        outputs = [o for n in nodes for o in n.output if o and o in consumed_after[i]]
        segments.append(Segment(kind=kind, nodes=const_nodes + nodes, initializers=init_names, inputs=inputs,
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


def segment_model(base_model, segment: Segment, tensors: dict, value_types: dict[str, int]):
    """A ModelProto for ``segment``; ``tensors`` maps each of its initializer names to a TensorProto
    (with data, or an ``external_placeholder``)."""
    from onnx import helper

    graph = helper.make_graph(
        segment.nodes, f"{base_model.graph.name}-segment",
        [helper.make_tensor_value_info(n, value_types[n], None) for n in segment.inputs],
        [helper.make_tensor_value_info(n, value_types[n], None) for n in segment.outputs],
        initializer=[tensors[n] for n in segment.initializers])
    return helper.make_model(graph, opset_imports=list(base_model.opset_import), ir_version=base_model.ir_version,
                             producer_name="rmt_core.segments")


def value_types(model) -> dict[str, int]:
    """Element type of every value in the graph (graph inputs/outputs, initializers, inferred intermediates)."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    types = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        types[vi.name] = vi.type.tensor_type.elem_type
    for t in model.graph.initializer:
        types[t.name] = t.data_type
    for n in model.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    types[n.output[0]] = a.t.data_type
    return types
