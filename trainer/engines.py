"""The configured rollout engine: HF generate (trainer/rollout.py), or vLLM (trainer/vllm_engine.py,
imported only when configured)."""

from .distributed import SINGLE
from .rollout import HFGenerateEngine


def make_engine(kind, runner, tokenizer, cfg, dist=SINGLE, config_dir=None, seed=0):
    """The configured engine. vLLM gets the HF model inside the runner (its weights, its config) and
    writes that config and the tokenizer to config_dir."""
    if kind == "vllm":
        if config_dir is None:
            raise ValueError("the vLLM engine needs a config_dir to write the model config to")
        from .vllm_engine import VLLMEngine

        return VLLMEngine(runner.model, tokenizer, cfg, dist, config_dir, seed)
    return HFGenerateEngine(runner, tokenizer, cfg.max_new_tokens, cfg.temperature, cfg.top_p, dist.world)
