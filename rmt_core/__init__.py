"""Regularized Mask Tuning (R-AMT, ICCV 2023) for CLIP image classifiers.

A binary mask over a few of CLIP's own image-encoder weights is learned from a handful of examples,
regularized by Gradient Dropout Regularity (GDR) against the zero-shot model, then multiplied into
the weights ("baked") and exported to ONNX. Serving needs no torch.

Modules (torch is imported only by the tuning/export side):
    config     TuneConfig: every setting of a tuning run, validated (no torch)
    templates  prompt templates (CoOp's per-dataset ones), class-name cleanup (no torch)
    images     safe image decoding with limits (no torch)
    preprocess open_clip's eval transform in PIL/numpy (no torch)
    runtime    OnnxClassifier: ONNX Runtime inference (no torch)
    artifact   the compact mask file format (no torch: numpy)
    backbones  open_clip model loading (configs registered from model_configs/, builtin weights)
    masking    BinaryMask parametrization, attach_masks / bake_masks / sparsity
    gdr        Gradient Dropout Regularity
    tuning     the tuning loop (progress callback with a post-flip ETA)
    candidates zero-shot / fitted head / mask / mask+head, validated; the best is published (numpy heads)
    calibration temperature scaling, ECE, the default min_score for "unknown" (no torch: numpy)
    export     ONNX export of the baked classifier + parity check
    pipeline   build_classifier: tune -> bake -> export -> report, into one directory
    world      a generated captioned image world (no torch): the data of the builtin backbone and the demo
    evaluation `rmt eval`: CoOp's few-shot protocol
    cli        the `rmt` command
"""

__version__ = "0.1.0"
