"""Thread pools follow the CPU the process is given (issue 17): affinity, cgroup quota, a configured limit."""
import subprocess
import sys
from pathlib import Path

from rmt_core.threads import (PARALLEL_MIN_WIDTH, apply_process_policy, available_cpus, build_threads, cgroup_cpu_quota,
                              plan_threads, torch_threads)

ROOT = Path(__file__).resolve().parents[2]


def test_cgroup_v2_quota_is_read(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cgroup_cpu_quota(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_quota(tmp_path) is None


def test_cgroup_v1_quota_is_read(tmp_path):
    v1 = tmp_path / "cpu"
    v1.mkdir()
    (v1 / "cpu.cfs_quota_us").write_text("50000\n")
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_quota(tmp_path) == 0.5
    (v1 / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_quota(tmp_path) is None
    assert cgroup_cpu_quota(tmp_path / "missing") is None


def test_threads_follow_quota_affinity_and_limit():
    assert available_cpus(affinity=16, quota=None, read_quota=False) == 16
    assert available_cpus(affinity=16, quota=2.0) == 2
    assert available_cpus(affinity=16, quota=2.5) == 3  # a part of a CPU still runs a thread
    assert available_cpus(affinity=2, quota=8.0) == 2
    assert available_cpus(affinity=16, quota=0.2) == 1
    assert available_cpus(affinity=16, quota=None, read_quota=False, limit=4) == 4
    plan = plan_threads(available_cpus(affinity=64, quota=3.0))
    assert (plan.cpus, plan.torch_threads, plan.ort_intra_threads, plan.torch_interop_threads) == (3, 3, 3, 1)


def test_process_policy_sets_passive_waits_and_keeps_user_values():
    env: dict[str, str] = {}
    plan = apply_process_policy(env, cpus=3)
    assert env == {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "3"} and plan.torch_threads == 3
    env = {"OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "7"}
    apply_process_policy(env, cpus=3)
    assert env == {"OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "7"}


def test_torch_in_a_policed_process_uses_the_planned_threads():
    # the policy must act before torch is imported: check it in a fresh interpreter
    code = ("from rmt_core.threads import apply_process_policy; import os; apply_process_policy(cpus=1); "
            "import torch; print(torch.get_num_threads(), os.environ['OMP_WAIT_POLICY'])")
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("OMP_")}
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["1", "PASSIVE"]


def test_narrow_towers_build_on_one_thread_wide_ones_on_all():
    assert build_threads(128, 2) == 1 and build_threads(64, 16) == 1  # the builtin / test towers
    assert build_threads(PARALLEL_MIN_WIDTH - 1, 8) == 1
    assert build_threads(PARALLEL_MIN_WIDTH, 8) == 8 and build_threads(768, 2) == 2
    assert build_threads(None, 4) == 4  # a tower of unknown width keeps what the process has
    assert build_threads(768, 0) == 1


def test_torch_threads_restores_the_pool_size():
    import torch

    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    try:
        with torch_threads(1):
            raise KeyError("boom")
    except KeyError:
        pass
    assert torch.get_num_threads() == before


def test_a_narrow_build_tunes_on_one_thread_and_records_it(tmp_path):
    import torch

    from rmt_core.config import TuneConfig
    from rmt_core.pipeline import build_classifier
    from tests.core.toys import colour_task

    before = torch.get_num_threads()
    config = TuneConfig(backbone="rmt-tiny-vit", pretrained=None, epochs=1, min_steps=4, batch_size=8,
                        learning_rate=1e-3, warmup_steps=0, seed=0)
    manifest = build_classifier(colour_task(n_per_class=6), config, tmp_path / "v", device="cpu")
    assert manifest["tuning"]["threads"] == 1  # rmt-tiny-vit is 64 wide
    assert torch.get_num_threads() == before


def test_the_heads_are_fitted_on_one_blas_thread_and_the_pool_is_restored_after(monkeypatch):
    """OpenBLAS split the probe's tiny products over every core: twice the CPU time, no faster. The head fits
    (the probe and the cache, whoever calls them: cross_validated_head, fit_best_head) run with numpy's BLAS on
    one thread; the size it had comes back."""
    import numpy as np
    from threadpoolctl import threadpool_info

    import rmt_core.candidates as candidates
    from rmt_core.head import Head
    from rmt_core.threads import one_blas_thread

    def blas_threads():
        return {i["filepath"]: i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"}

    before = blas_threads()
    assert before  # numpy's BLAS is loaded
    with one_blas_thread():
        assert set(blas_threads().values()) == {1}
    assert blas_threads() == before

    seen = []
    real_fit = candidates._fit_residuals

    def watched(*args, **kwargs):
        seen.append(set(blas_threads().values()))
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(candidates, "_fit_residuals", watched)
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 6)
    features = rng.standard_normal((len(y), 16)) + 2 * np.eye(3, 16)[y]
    zero_shot = Head(W=np.eye(3, 16, dtype=np.float32), b=np.zeros(3, np.float32), scale=10.0)
    candidates.cross_validated_head(features, y, zero_shot)
    candidates.fit_best_head(features, y, zero_shot)
    assert seen and all(s == {1} for s in seen)
    assert blas_threads() == before
