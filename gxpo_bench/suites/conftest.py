"""What the suites share: the run's spec (--gxpo-spec, a JSON object the gxpo-bench CLI writes; alone, the
--fast defaults), the device, and the JSON additions (the spec, each skipped alternative and why) that
gxpo-bench reads back."""

import json
import os

os.environ.pop("TRITON_INTERPRET", None)  # before gxpo_kernels is imported: the interpreter is never timed

import pytest  # noqa: E402
import torch  # noqa: E402

SKIPPED = []  # {name, reason, ...}: alternatives this machine cannot run


def pytest_sessionstart(session):
    SKIPPED.clear()


def pytest_addoption(parser):
    parser.getgroup("gxpo-bench").addoption("--gxpo-spec", default="{}", help="the run's settings as JSON")


def spec(config) -> dict:
    return {"fast": True, **json.loads(config.getoption("--gxpo-spec"))}


@pytest.fixture(scope="session")
def run_spec(request) -> dict:
    return spec(request.config)


@pytest.fixture(scope="session")
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def skip(request, reason: str, **info):
    SKIPPED.append({"name": request.node.name, "reason": reason, **info})
    pytest.skip(reason)


def timed(fn, device):
    """fn, synchronized with the device so that the benchmark's clock sees its kernels finish."""
    if device.type != "cuda":
        return fn
    return lambda *args: (fn(*args), torch.cuda.synchronize(device))


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["gxpo"] = {"spec": spec(config), "skipped": list(SKIPPED)}
