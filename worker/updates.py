"""The update task: a new version from the serving one's images plus the changes the request fixed.

The new version is judged against its parent (the version serving when the update was asked for) on the
same held-out images, which the new version never trains on: the parent's images that the parent never
trained on either (its build's holdout, or what an earlier update recorded as unseen), of the classes both
keep, and a holdout of the added classes' images. New images of existing classes are never judged on (a
mislabelled one would reward the model that learned the mistake). The new version serves only if its accuracy
there is not lower than the parent's, or with config.force; otherwise the parent keeps serving and the job's
``update`` report says why with both accuracies. When the parent trained on all its images, its own images
are the comparison (which favours it; the report says so).

Mask tuning warm-starts from the parent's mask when both use the same base and method.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from rmt_core.config import TuneConfig
from rmt_service.settings import Settings
from rmt_service.store import MANIFEST, Store, StoreError, VersionRecord, new_version_id

log = logging.getLogger(__name__)


def _held_by_build(pairs: list[tuple], config: TuneConfig) -> list[tuple]:
    """The images a build of ``pairs`` (in this order) held out of training: the same seeded split it made."""
    from rmt_core.candidates import has_holdout
    from rmt_core.pipeline import split_holdout

    counts: dict[str, int] = {}
    for _, label in pairs:
        counts[label] = counts.get(label, 0) + 1
    if not counts or not has_holdout(list(counts.values()), config):
        return []
    return split_holdout(pairs, config.holdout, config.seed)[1]


def unseen_by(parent: VersionRecord, parent_rows: list[tuple[int, Path, str]]) -> set[int]:
    """Upload idx of the parent's images that it never trained on: what an update recorded, or for a build
    (and a class added by name on top of it) the holdout its build split off."""
    manifest = parent.manifest or {}
    if manifest.get("unseen_samples") is not None:
        return {int(i) for i in manifest["unseen_samples"]}
    pairs = [(path, label) for _, path, label in parent_rows]
    index = {id(pair): idx for pair, (idx, _, _) in zip(pairs, parent_rows)}
    config = TuneConfig.from_dict({k: v for k, v in (manifest.get("config") or {}).items() if k != "force"})
    return {index[id(pair)] for pair in _held_by_build(pairs, config)}


def comparison_split(parent: VersionRecord, parent_rows: list[tuple[int, Path, str]], idx: list[int],
                     samples: list[tuple[Path, str]], config: TuneConfig) -> tuple[list, list, str]:
    """(train, held, what held is) for an update building ``samples`` (upload ``idx``, same order).

    held = the parent's images it never trained on (of classes both keep, labels unchanged) plus a seeded
    holdout of the added classes' images; the new version trains on everything else. When the parent saw
    every one of its images, its own images are split instead (that favours the parent: said in the report).
    """
    from rmt_core.pipeline import split_holdout

    parent_labels = {label for _, _, label in parent_rows}
    parent_keys = {(i, label) for i, _, label in parent_rows}
    unseen = unseen_by(parent, parent_rows)
    fraction = config.holdout if config.holdout > 0 else 0.2
    position = {id(s): k for k, s in enumerate(samples)}
    held_old = [s for i, s in zip(idx, samples) if i in unseen and (i, s[1]) in parent_keys]
    what = "images the serving version never trained on"
    if not held_old:
        kept = [s for i, s in zip(idx, samples) if (i, s[1]) in parent_keys]
        _, held_old = split_holdout(kept, fraction, config.seed)
        what = "the serving version's own images (it trained on them, which favours it)"
    _, held_new = split_holdout([s for s in samples if s[1] not in parent_labels], fraction, config.seed)
    held_ids = {id(s) for s in [*held_old, *held_new]}
    train = [s for s in samples if id(s) not in held_ids]
    if len({label for _, label in train}) < len({label for _, label in samples}):  # a class would lose all
        return list(samples), [], "nothing (a class has too few images to hold any out)"
    held = sorted([*held_old, *held_new], key=lambda s: position[id(s)])
    return train, held, what


def accuracy_on(version_dir: Path, bases_dir: Path, samples: list[tuple[Path, str]]) -> float | None:
    """Top-1 accuracy of a stored version on (image, label) pairs through the serving runtime (no torch)."""
    import numpy as np
    from PIL import Image

    from rmt_core.runtime import load_classifier

    if not samples:
        return None
    classifier = load_classifier(version_dir, bases_dir=bases_dir, providers="cpu")
    correct = 0
    for start in range(0, len(samples), 32):
        chunk = samples[start:start + 32]
        batch = []
        for path, _ in chunk:
            with Image.open(path) as img:
                batch.append(classifier.preprocess(img.convert("RGB")))
        probs = classifier.run(np.stack(batch))
        for row, (_, label) in zip(probs, chunk):
            correct += int(classifier.labels[int(np.argmax(row))] == label)
    return correct / len(samples)


def parent_mask_bits(store: Store, parent: VersionRecord, config: TuneConfig) -> dict | None:
    """The parent's mask bits when the new build can start from them (same backbone, weights and method)."""
    from rmt_core.artifact import load_masks

    manifest = parent.manifest or {}
    mask_file = manifest.get("mask_file")
    same = (manifest.get("backbone"), manifest.get("pretrained"), manifest.get("method")) == \
        (config.backbone, config.pretrained, config.method)
    if not mask_file or not same:
        return None
    path = store.artifact_path(parent.classifier_id, mask_file, parent)
    if path is None:
        return None
    bits, _ = load_masks(path)
    return bits


def decide_serving(parent_accuracy: float | None, new_accuracy: float | None, force: bool) -> tuple[bool, str]:
    """Serve the new version? Not worse on the same held-out images, or forced."""
    if force:
        return True, "config.force: served without comparing"
    if parent_accuracy is None or new_accuracy is None:
        return True, "no images could be held out to compare on; served (the build's own validation applies)"
    if new_accuracy >= parent_accuracy:
        return True, (f"not worse than the serving version on the same held-out images "
                      f"({new_accuracy:.1%} vs {parent_accuracy:.1%})")
    return False, (f"worse than the serving version on the same held-out images ({new_accuracy:.1%} vs "
                   f"{parent_accuracy:.1%}); the serving version stays. Serve it anyway with "
                   "POST .../versions/{version_id}/serve, or send config.force=true")


def run_update(store: Store, settings: Settings, job_id: str, owner: str, classifier_id: str,
               spec: dict[str, Any], heartbeat, report, build_kwargs: dict[str, Any]) -> str:
    """Build, compare and publish one update (inside run_tune_job's lease, heartbeat and error handling)."""
    from rmt_core.pipeline import TuningCancelled, build_classifier

    parent = store.get_version(classifier_id, spec["parent_version_id"])
    if parent is None:
        raise StoreError(f"the version {spec['parent_version_id']} this update starts from is gone")
    values = dict(spec.get("config") or {})
    force = bool(values.pop("force", False))
    config = TuneConfig.from_dict(values)
    idx = list(spec["samples"])
    samples = store.samples_by_idx(classifier_id, idx)
    parent_rows = store.version_samples_indexed(classifier_id, parent)
    parent_samples = [(path, label) for _, path, label in parent_rows]
    train, held, compared_what = comparison_split(parent, parent_rows, idx, samples, config)
    # what this version never trains on (the comparison's images and its build's own holdout), for the next
    position = {id(s): i for i, s in zip(idx, samples)}
    unseen = sorted({position[id(s)] for s in [*held, *_held_by_build(train, config)]})
    bits = parent_mask_bits(store, parent, config)
    build_dir = store.new_build_dir(classifier_id)
    try:
        manifest = build_classifier(train, config, build_dir, progress=report.progress,
                                    should_stop=heartbeat.stop_requested.is_set, device=settings.device,
                                    initial_bits=bits, **build_kwargs)
        heartbeat.beat()
        if heartbeat.stop_requested.is_set():
            raise TuningCancelled(heartbeat.reason)
        parent_accuracy = accuracy_on(store.version_dir(parent), store.bases_dir, held) if held else None
        new_accuracy = accuracy_on(build_dir, store.bases_dir, held) if held else None
        serve, reason = decide_serving(parent_accuracy, new_accuracy, force)
        warm = {"from_version": parent.version_id, "masks": len(bits)} if bits and manifest.get("steps") else None
        parent_counts: dict[str, int] = {}
        for _, label in parent_samples:
            parent_counts[label] = parent_counts.get(label, 0) + 1
        new_counts: dict[str, int] = {}
        for _, label in samples:
            new_counts[label] = new_counts.get(label, 0) + 1
        change = {"added_images": int(spec.get("added") or 0), "feedback_images": len(spec.get("feedback_ids") or []),
                  "added_classes": sorted(set(new_counts) - set(parent_counts)),
                  "removed_classes": sorted(set(parent_counts) - set(new_counts)),
                  "compared_on": len(held), "compared_images": compared_what, "parent_accuracy": parent_accuracy, "new_accuracy": new_accuracy,
                  "served": serve, "reason": reason, "forced": force}
        version_id = new_version_id()
        change["version_id"] = version_id
        manifest.update(warm_start=warm, change=change, update_job_id=job_id, unseen_samples=unseen)
        (build_dir / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
        report.values = {**report.values, "update": {**change, "warm_start": warm}}
        report.write(warnings=[*report.warnings, *((manifest or {}).get("warnings") or [])])
        version = store.publish_version(classifier_id, build_dir, job_id=job_id, owner=owner, final=True,
                                        serve=serve, source="update", parent_version_id=parent.version_id,
                                        samples=list(spec["samples"]), version_id=version_id)
        log.info("job %s: version %s of %s %s (%s)", job_id, version.version_id, classifier_id,
                 "serves" if serve else "kept, not served", reason)
        return "succeeded"
    finally:
        store.discard(build_dir)
