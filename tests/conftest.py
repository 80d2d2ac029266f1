import os

import pytest
import torch

# Kernels run under Triton's interpreter on CPU; it must be on before gxpo_kernels is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from gxpo_kernels import backend  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def interpreter_env(monkeypatch):
    """Every test starts with the session's TRITON_INTERPRET: gxpo-bench's main() drops it (the interpreter is
    never timed), and a test that calls main() in this process must not take it from the tests after it."""
    if INTERPRET is not None:
        monkeypatch.setenv("TRITON_INTERPRET", INTERPRET)


@pytest.fixture(autouse=True)
def poison_kernel_outputs(monkeypatch):
    monkeypatch.setattr(backend, "poison_outputs", True)


@pytest.fixture
def device():
    return "cuda" if torch.cuda.is_available() else "cpu"




@pytest.fixture(params=["triton", "torch"])
def path(request, monkeypatch):
    """Each test runs on the Triton kernel (interpreter on CPU) and on the torch fallback path."""
    x = torch.zeros(1, device="cuda" if torch.cuda.is_available() else "cpu")
    if request.param == "torch":
        monkeypatch.setattr(backend, "use_triton", lambda t: False)
    assert backend.use_triton(x) == (request.param == "triton")
    return request.param
