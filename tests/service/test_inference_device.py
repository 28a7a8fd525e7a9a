"""Which device serving runs on: CUDA when ONNX Runtime's CUDA EP really works, else the CPU, logged once.

The base install (and the default API image) carries the CPU build of onnxruntime; the GPU API image swaps in
onnxruntime-gpu. CI has no GPU: the CUDA leg runs only on a host where ONNX Runtime offers CUDA and the
NVIDIA driver loads; the others run everywhere.
"""
from __future__ import annotations

import ctypes
import logging

import numpy as np
import onnxruntime as ort
import pytest
from fastapi.testclient import TestClient
from onnx import TensorProto, helper

from app.main import create_app
from rmt_core import runtime
from tests.service.helpers import COLORS, FakeQueue, image_bytes, make_settings

CPU_ONLY = {"device": "cpu", "providers": ["CPUExecutionProvider"]}


def _driver_loads() -> bool:
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


CUDA_HERE = "CUDAExecutionProvider" in ort.get_available_providers() and _driver_loads()


@pytest.fixture
def fresh_decision():
    """The CUDA decision is cached per process; forget it around each test that watches it being made."""
    runtime._cuda_usable.cache_clear()
    yield
    runtime._cuda_usable.cache_clear()


def _tiny_model() -> bytes:
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "tiny",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8).SerializeToString()


def _fallback_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "rmt_core.runtime" and "serves on the CPU" in r.getMessage()]


@pytest.mark.skipif(CUDA_HERE, reason="this host serves on CUDA: the CPU fallback does not apply")
def test_no_cuda_falls_back_to_the_cpu_with_one_log_line(fresh_decision, caplog):
    caplog.set_level(logging.INFO, logger="rmt_core.runtime")
    for providers in ("auto", "cuda", "auto"):
        session = runtime.make_session(_tiny_model(), providers)
        assert session.get_providers() == ["CPUExecutionProvider"]
        np.testing.assert_array_equal(session.run(None, {"x": np.array([-1.0, 2.0], np.float32)})[0], [0.0, 2.0])
        assert runtime.inference_device(providers) == CPU_ONLY
    lines = _fallback_lines(caplog)
    assert len(lines) == 1, lines  # once per process, not once per session
    assert not [r for r in caplog.records if "CUDA was asked for" in r.getMessage()]


@pytest.mark.skipif(_driver_loads(), reason="this host has the NVIDIA driver")
def test_gpu_build_on_a_host_without_a_driver_says_why_once(fresh_decision, caplog, monkeypatch):
    """The GPU image on a machine without a GPU: onnxruntime-gpu offers the CUDA EP but libcuda is absent.

    The CPU build cannot offer CUDA, so the provider list is what onnxruntime-gpu reports; the driver check,
    the fallback and the sessions are real.
    """
    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    caplog.set_level(logging.INFO, logger="rmt_core.runtime")
    assert runtime.inference_device("auto") == CPU_ONLY
    for _ in range(3):
        assert runtime.make_session(_tiny_model(), "cuda").get_providers() == ["CPUExecutionProvider"]
    lines = _fallback_lines(caplog)
    assert len(lines) == 1 and "no NVIDIA driver" in lines[0], lines


def test_cpu_setting_never_probes_cuda(fresh_decision, caplog):
    caplog.set_level(logging.INFO, logger="rmt_core.runtime")
    assert runtime.inference_device("cpu") == CPU_ONLY
    assert runtime._cuda_usable.cache_info().currsize == 0 and not _fallback_lines(caplog)
    with pytest.raises(ValueError):
        runtime.inference_device("gpu")


@pytest.mark.skipif(not CUDA_HERE, reason="needs onnxruntime-gpu and an NVIDIA GPU (the GPU API image on a GPU host)")
def test_cuda_host_serves_on_cuda(fresh_decision):
    assert runtime.inference_device("auto") == {"device": "cuda",
                                                "providers": ["CUDAExecutionProvider", "CPUExecutionProvider"]}
    assert runtime.make_session(_tiny_model(), "auto").get_providers()[0] == "CUDAExecutionProvider"
    assert runtime.inference_device("cpu") == CPU_ONLY


def test_readyz_reports_the_providers_the_served_classifier_runs_on(tuned_client, tuned):
    url = f"/v1/classifiers/{tuned['classifier_id']}/classify"
    response = tuned_client.post(url, files={"file": ("r.png", image_bytes(COLORS["red"]), "image/png")})
    assert response.status_code == 200, response.text
    ready = tuned_client.get("/readyz")
    assert ready.status_code == 200
    inference = ready.json()["inference"]
    served = tuned_client.app.state.cache._entries[tuned["classifier_id"]].classifier
    assert served.providers == inference["providers"]
    assert inference["device"] == ("cuda" if CUDA_HERE else "cpu")
    if not CUDA_HERE:
        assert inference == CPU_ONLY


def test_readyz_reports_cpu_when_the_setting_says_cpu(tmp_path):
    settings = make_settings(tmp_path / "data", ort_providers="cpu")
    with TestClient(create_app(settings, queue=FakeQueue())) as client:
        body = client.get("/readyz").json()
    assert body["checks"] == {"store": "ok", "space": "ok", "records": "ok", "broker": "ok"}
    assert body["inference"] == CPU_ONLY
