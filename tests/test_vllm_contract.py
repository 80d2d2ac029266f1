"""trainer/vllm_engine.py and tests/fake_vllm.py against vLLM 0.33's own source (tests/vllm_contract.py), read
from the wheel that `make install` unpacks (its .py files, no dependencies) into $GXPO_VLLM_SRC. Nothing is
installed or imported from vLLM at run time. What this cannot see (CUDA kernels, the engine's behaviour,
the weight sync's speed) needs a GPU."""

import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import vllm_contract

pytest.importorskip("transformers")

DEFAULT_SRC = Path(__file__).parents[1] / ".venv" / "vllm-src"


@pytest.fixture(scope="module")
def vllm_src() -> Path:
    """The folder holding vllm/; make test names it and so a missing one fails there."""
    named = os.environ.get("GXPO_VLLM_SRC")
    root = Path(named) if named else DEFAULT_SRC
    if not (root / "vllm" / "entrypoints" / "llm.py").exists():
        if named:
            pytest.fail(f"GXPO_VLLM_SRC={named} holds no vLLM source: make install unpacks it")
        pytest.skip(f"no vLLM source at {root} (make install unpacks it)")
    return root


@pytest.fixture(scope="module")
def engine_calls(tmp_path_factory):
    """The keyword arguments VLLMEngine gives LLM, on one rank and on two, run against the fake."""
    import sys

    import fake_vllm
    import torch

    from trainer.config import load_config
    from trainer.models import load_policy
    from trainer.vllm_engine import IN_PROCESS_ENV, VLLMEngine

    cfg = load_config(overrides=[("model", "tiny-random"), ("rollout.vllm_sleep", "true")]).rollout
    model, tok = load_policy("tiny-random", torch.float32)
    saved, sys.modules["vllm"] = sys.modules.get("vllm"), fake_vllm
    env_before = {k: os.environ.get(k) for k in IN_PROCESS_ENV}
    try:
        calls = []
        for world in (1, 2):
            dist = SimpleNamespace(main=True, world=world, barrier=lambda: None)
            engine = VLLMEngine(model, tok, cfg, dist, tmp_path_factory.mktemp(f"cfg{world}"))
            calls.append(engine.llm.init_kwargs)
            assert {k: os.environ[k] for k in IN_PROCESS_ENV} == IN_PROCESS_ENV
    finally:
        sys.modules["vllm"] = saved
        for k, v in env_before.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    return calls


def _problems(root, engine_calls):
    from trainer.vllm_engine import IN_PROCESS_ENV, WORKER_MODEL_ATTRS

    problems = []
    for kwargs in engine_calls:
        problems += vllm_contract.check(root, kwargs, WORKER_MODEL_ATTRS, IN_PROCESS_ENV)
    return sorted(set(problems))


def test_vllm_source_is_033(vllm_src):
    version = (vllm_src / "vllm" / "_version.py").read_text()
    assert "0.33.0" in version


def test_engine_and_fake_keep_to_vllms_api(vllm_src, engine_calls):
    assert engine_calls[1]["distributed_executor_backend"] == "external_launcher"
    assert _problems(vllm_src, engine_calls) == []


# (file, text in vLLM 0.33, its renamed form, what the check must name)
RENAMES = [
    ("vllm/sampling_params.py", "    logprobs: int | None", "    num_logprobs: int | None", "'logprobs'"),
    ("vllm/sampling_params.py", "    seed: int | None", "    random_seed: int | None", "'seed'"),
    ("vllm/outputs.py", "    token_ids: GenericSequence[int]", "    ids: GenericSequence[int]", "'token_ids'"),
    ("vllm/outputs.py", "    logprobs: SampleLogprobs | None", "    lps: SampleLogprobs | None", "'logprobs'"),
    ("vllm/logprobs.py", "    logprob: float", "    value: float", "'logprob'"),
    ("vllm/entrypoints/llm.py", "    def wake_up(", "    def resume(", "'wake_up'"),
    ("vllm/entrypoints/llm.py", "    def sleep(", "    def pause(", "'sleep'"),
    ("vllm/entrypoints/llm.py", "        use_tqdm:", "        show_progress:", "'use_tqdm'"),
    ("vllm/engine/arg_utils.py", "    enable_sleep_mode: bool", "    sleep_mode: bool", "'enable_sleep_mode'"),
    ("vllm/engine/arg_utils.py", "    logprobs_mode: LogprobsMode", "    lp_mode: LogprobsMode",
     "'logprobs_mode'"),
    ("vllm/config/model.py", '"processed_logprobs"\n]', '"processed_logprob"\n]', "'processed_logprobs'"),
    ("vllm/config/parallel.py", '"uni", "external_launcher"]', '"uni", "external"]', "'external_launcher'"),
    ("vllm/v1/executor/uniproc_executor.py", "self.driver_worker = ", "self.worker0 = ", "self.driver_worker"),
    ("vllm/v1/worker/gpu_worker.py", "self.model_runner", "self.runner", "self.model_runner"),
    ("vllm/model_executor/models/llama.py", "    def load_weights(", "    def load(", "'load_weights'"),
    ("vllm/envs.py", '    "VLLM_ENABLE_V1_MULTIPROCESSING": lambda', '    "VLLM_V1_MULTIPROCESSING": lambda',
     "VLLM_ENABLE_V1_MULTIPROCESSING"),
]


@pytest.mark.parametrize(("file", "text", "renamed", "named"), RENAMES, ids=[r[3].strip("'") + "@" + r[0].split("/")[-1]
                                                                            for r in RENAMES])
def test_a_renamed_name_in_a_copy_fails_the_check(vllm_src, engine_calls, tmp_path, file, text, renamed, named):
    for f in vllm_contract.FILES:
        if (vllm_src / f).exists():
            (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(vllm_src / f, tmp_path / f)
    assert _problems(tmp_path, engine_calls) == []  # the copy alone passes
    source = (tmp_path / file).read_text()
    assert text in source, f"{file} no longer holds {text!r}"
    (tmp_path / file).write_text(source.replace(text, renamed))
    problems = _problems(tmp_path, engine_calls)
    assert any(named in p for p in problems), problems


# (text in tests/fake_vllm.py, what the fake would claim instead, what the check must name)
FAKE_EDITS = [
    ("gpu_memory_utilization=0.92", "gpu_memory_utilization=0.9", "'gpu_memory_utilization' defaults to 0.92"),
    ("    detokenize: bool = True\n", "    detokenize: bool = True\n    best_of: int = 1\n", "'best_of'"),
    ("def __init__(self, model, *, skip_tokenizer_init", "def __init__(self, model, skip_tokenizer_init",
     "positional parameters"),
    ("    def wake_up(self):", "    def wake_up(self, tags=None, now=False):", "'now'"),
    ("class Logprob:", "class Logprobs:", "fake_vllm.Logprobs"),
]


@pytest.mark.parametrize(("text", "edited", "named"), FAKE_EDITS, ids=[e[2].split("'")[1] if "'" in e[2] else e[2]
                                                                       for e in FAKE_EDITS])
def test_a_fake_with_a_name_vllm_lacks_fails_the_check(vllm_src, engine_calls, tmp_path, text, edited, named):
    source = vllm_contract.FAKE.read_text()
    assert text in source, f"fake_vllm.py no longer holds {text!r}"
    fake = tmp_path / "fake_vllm.py"
    fake.write_text(source.replace(text, edited))
    from trainer.vllm_engine import IN_PROCESS_ENV, WORKER_MODEL_ATTRS

    problems = vllm_contract.check(vllm_src, engine_calls[0], WORKER_MODEL_ATTRS, IN_PROCESS_ENV, fake)
    assert any(named in p for p in problems), problems
