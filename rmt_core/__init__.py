"""Regularized Mask Tuning (R-AMT, ICCV 2023) for CLIP image classifiers.

A binary mask over a few of CLIP's own image-encoder weights is learned from a handful of examples,
regularized by Gradient Dropout Regularity (GDR) against the zero-shot model, then multiplied into
the weights ("baked") when a classifier loads. A classifier is a shared base (the frozen encoder, exported to
ONNX once per backbone weights) + its mask + its head. Serving needs no torch.

Modules (torch is imported only by the tuning/export side):
    config     TuneConfig: every setting of a tuning run, validated (no torch)
    templates  prompt templates (CoOp's per-dataset ones), class-name cleanup (no torch)
    images     safe image decoding with limits (no torch)
    preprocess open_clip's eval transform in PIL/numpy (no torch)
    runtime    load_classifier / BaseRegistry: serving over a shared base; OnnxClassifier for old dirs (no torch)
    segments   the base graph cut into shared and per-classifier ONNX Runtime sessions (no torch)
    head       Head: features -> logits as numpy arrays, head.npz, appendable to an ONNX graph (no torch)
    materialize a self-contained model.onnx from base + mask + head, size-bounded cache (no torch)
    artifact   the mask file (packbits + zlib; older LZMA and Rice-coded files load) and version files (no torch)
    files      atomic file writes (no torch)
    base       the shared base: the frozen encoder exported once, content-addressed by its weights
    backbones  open_clip model loading (configs registered from model_configs/, builtin weights)
    masking    BinaryMask parametrization, attach_masks / bake_masks / sparsity
    gdr        Gradient Dropout Regularity
    tuning     the tuning loop (progress callback with a post-flip ETA)
    candidates zero-shot / fitted head / mask / mask+head, validated; the best is published (numpy heads)
    calibration temperature scaling, ECE, the default min_score for "unknown" (no torch: numpy)
    export     ONNX export helpers + parity checks (torch vs ONNX Runtime, torch vs the served path)
    pipeline   build_classifier: candidates -> select -> base + mask + head -> report, into one directory
    world      a generated captioned image world (no torch): the data of the builtin backbone and the demo
    evaluation `rmt eval`: CoOp's few-shot protocol
    cli        the library's commands (tune, predict, export, info, sample, eval); `rmt` itself is rmt_cli
"""

__version__ = "0.1.0"
