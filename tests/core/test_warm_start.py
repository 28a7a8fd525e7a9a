"""Warm-started masks: an earlier version's kept bits become the starting scores (update jobs)."""
from __future__ import annotations

import numpy as np

from rmt_core.backbones import load_backbone
from rmt_core.masking import attach_masks, mask_bits, warm_start_masks


def test_warm_start_reproduces_the_earlier_mask_and_skips_what_does_not_fit():
    backbone = load_backbone("rmt-tiny-vit", None, device="cpu", seed=0)
    masks = attach_masks(backbone.model, "amt", init=1e-2, threshold=5e-3)
    rng = np.random.default_rng(0)
    earlier = {name: rng.random(tuple(m.scores.shape)) > 0.3 for name, m in masks.items()}
    first, odd = sorted(earlier)[:2]
    earlier[odd] = earlier[odd].reshape(-1)  # a shape this model does not have: left at its fresh start
    earlier["visual.not_a_parameter"] = np.ones(3, bool)

    seeded = warm_start_masks(masks, earlier, init=1e-2, threshold=5e-3)

    assert odd not in seeded and "visual.not_a_parameter" not in seeded and first in seeded
    assert set(seeded) == set(masks) - {odd}
    bits = mask_bits(backbone.model)  # the names a saved mask uses are the names warm start reads
    assert set(bits) == set(masks)
    for name in seeded:
        np.testing.assert_array_equal(bits[name], earlier[name])
        dropped = masks[name].scores.detach().numpy()[~earlier[name]]
        # just below the threshold (a tenth of init's margin), so a few consistent steps bring it back
        assert np.allclose(dropped, 5e-3 - 0.1 * (1e-2 - 5e-3))
        assert (dropped < 5e-3).all()
        kept = masks[name].scores.detach().numpy()[earlier[name]]
        assert np.allclose(kept, 1e-2)
    assert bits[odd].all()
