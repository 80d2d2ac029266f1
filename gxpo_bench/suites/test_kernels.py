"""Each kernel against its alternatives (gxpo_bench/kernels.py's cases), one benchmark per (case, impl), with the
floor for its shape (bytes over the measured copy rate, FLOPs over the measured matmul rate) in extra_info."""

import pytest
import torch

from gxpo_bench import kernels, timing
from gxpo_bench.suites.conftest import skip, spec, timed

_built = {}  # the current case's inputs only: the next case frees them


def _device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pytest_generate_tests(metafunc):
    if "case_impl" in metafunc.fixturenames:
        fast = spec(metafunc.config)["fast"]
        params = [(i, impl) for i, (_, _, impls, _) in enumerate(kernels.case_list(_device(), fast))
                  for impl in impls]
        cases = kernels.case_list(_device(), fast)
        metafunc.parametrize("case_impl", params,
                             ids=[f"{cases[i][0]}[{cases[i][1]}]-{impl}" for i, impl in params])


@pytest.fixture(scope="session")
def settings(run_spec, device):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    fast = run_spec["fast"]
    compile_ = run_spec.get("compile")
    compile_ = compile_ if compile_ is not None else not (fast and device.type == "cpu")
    reps = run_spec.get("reps") or (5 if fast else 20 if device.type == "cuda" else 10)
    return {"dtype": dtype, "fast": fast, "compile": compile_, "reps": reps,
            "ceilings": timing.ceilings(device, dtype, fast)}


def _case(i, device, settings):
    if i not in _built:
        _built.clear()
        case, shape, _, build = kernels.case_list(device, settings["fast"])[i]
        _built[i] = (case, shape, *build(device, settings["dtype"], device.type == "cuda", settings["compile"]))
    return _built[i]


def skip_reason(impl: str) -> str:
    return ("torch.compile off (--fast on CPU; --compile to force)" if impl == "torch_compile" else
            "needs CUDA (Triton interpreter not timed)" if impl == "liger" or impl.startswith("ours")
            else "not available here")


def test_kernel(benchmark, request, case_impl, device, settings):
    i, impl = case_impl
    case, shape, impls, nbytes, flops = _case(i, device, settings)
    ceil = settings["ceilings"]
    floor_s = max(nbytes / ceil["copy_bytes_per_s"], flops / ceil["matmul_flops_per_s"])
    benchmark.extra_info.update({"case": case, "shape": shape, "impl": impl, "bytes": nbytes, "flops": flops,
                                 "floor_s": floor_s, "ceilings": ceil})
    if impls[impl] is None:
        skip(request, skip_reason(impl), case=case, shape=shape, impl=impl)
    fn, setup = impls[impl]
    peak = timing.measure(fn, setup, device, reps=1, warmup=1)["peak_mib"]  # warm-up, and the peak on CUDA
    benchmark.extra_info["peak_mib"] = peak

    def fresh():
        args = setup()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return args, {}

    benchmark.pedantic(timed(fn, device), setup=fresh, rounds=settings["reps"], warmup_rounds=1, iterations=1)
