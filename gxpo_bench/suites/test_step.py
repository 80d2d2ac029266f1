"""Whole training updates per update rule (gxpo_bench/step.py's AlgoBench on its fixed synthetic batch), one
benchmark per variant; each step's phase times and the medians gxpo-bench's table reads in extra_info."""

import torch

from gxpo_bench import step
from gxpo_bench.suites.conftest import spec


def step_spec(config) -> dict:
    s = spec(config)
    if "variants" in s:
        return s
    return step.plan(["grpo", "sfpo", "gxpo"], torch.cuda.is_available(), s["fast"])


def pytest_generate_tests(metafunc):
    if "variant" in metafunc.fixturenames:
        variants = step_spec(metafunc.config)["variants"]
        metafunc.parametrize("variant", variants, ids=[name for name, _ in variants])


def test_step(benchmark, request, variant, device):
    s = step_spec(request.config)
    name, overrides = variant
    bench = step.AlgoBench(name, s["model"], tuple(s["batch_shape"]), s["beta"], device, overrides, s["lengths"],
                           s["zero_adv_frac"])
    for _ in range(s["warmup"]):
        bench.step(record=False)
    benchmark.pedantic(bench.step, args=(True,), rounds=s["steps"], iterations=1)
    benchmark.extra_info["summary"] = step.summarize(name, bench.rows)
    assert len(bench.rows) == s["steps"]
