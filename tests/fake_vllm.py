"""A stand-in for the slice of vLLM's API that trainer/vllm_engine.py uses (LLM with dummy weights,
load_weights through the driver worker, per-request seeds, logprobs=0, sleep/wake_up), backed by a
transformers model on CPU, so the engine's glue is tested without a GPU. It refuses what vLLM refuses:
unknown weight names, generate while asleep. It has only names vLLM 0.33 has, with its defaults and its
positional / keyword-only parameters (tests/test_vllm_contract.py compares them); `instances`, `events`,
`init_kwargs`, `hf_model` and `loaded` are the tests' own bookkeeping."""

from dataclasses import dataclass
from types import SimpleNamespace

import torch
from transformers import AutoConfig, AutoModelForCausalLM


@dataclass(kw_only=True)
class Logprob:
    logprob: float


@dataclass(kw_only=True)
class CompletionOutput:
    token_ids: tuple
    logprobs: list


@dataclass(kw_only=True)
class RequestOutput:
    outputs: list


@dataclass(kw_only=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: list | None = None
    max_tokens: int | None = 16
    logprobs: int | None = None
    detokenize: bool = True


class WorkerModel:
    def __init__(self, hf_model):
        self.hf_model, self.loaded = hf_model, []

    @torch.no_grad()
    def load_weights(self, weights):
        params = self.hf_model.state_dict()
        for name, tensor in weights:
            if name not in params:
                raise ValueError(f"There is no module or parameter named '{name}'")
            params[name].copy_(tensor)
            self.loaded.append(name)


class LLM:
    instances = []

    def __init__(self, model, *, skip_tokenizer_init=False, tensor_parallel_size=1, dtype="auto", seed=0,
                 gpu_memory_utilization=0.92, load_format="auto", distributed_executor_backend=None,
                 enable_prefix_caching=None, logprobs_mode="raw_logprobs", enable_sleep_mode=False):
        self.init_kwargs = {k: v for k, v in locals().items() if k != "self"}
        assert load_format == "dummy" and skip_tokenizer_init
        self.hf_model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model)).eval()
        self.worker = WorkerModel(self.hf_model)
        self.llm_engine = SimpleNamespace(model_executor=SimpleNamespace(
            driver_worker=SimpleNamespace(model_runner=SimpleNamespace(model=self.worker))))
        self.sleep_mode, self.logprobs_mode, self.asleep, self.events = enable_sleep_mode, logprobs_mode, False, []
        LLM.instances.append(self)

    @torch.no_grad()
    def generate(self, prompts, sampling_params=None, *, use_tqdm=True):
        assert not self.asleep, "generate while asleep"
        self.events.append("generate")
        return [self._sample(p["prompt_token_ids"], sp) for p, sp in zip(prompts, sampling_params, strict=True)]

    def _sample(self, prompt_ids, sp: SamplingParams):
        assert sp.top_p == 1.0 and sp.logprobs == 0 and not sp.detokenize
        gen = torch.Generator().manual_seed(sp.seed)
        ids, tokens, logprobs = list(prompt_ids), [], []
        for _ in range(sp.max_tokens):
            logits = self.hf_model(torch.tensor([ids])).logits[0, -1].float()
            processed = torch.log_softmax(logits / sp.temperature, -1)
            token = int(torch.multinomial(processed.exp(), 1, generator=gen))
            logp = processed if self.logprobs_mode == "processed_logprobs" else torch.log_softmax(logits, -1)
            tokens.append(token)
            logprobs.append({token: Logprob(logprob=float(logp[token]))})
            ids.append(token)
            if token in (sp.stop_token_ids or []):
                break
        return RequestOutput(outputs=[CompletionOutput(token_ids=tuple(tokens), logprobs=logprobs)])

    def sleep(self, level=1):
        assert self.sleep_mode, "sleep needs enable_sleep_mode=True"
        self.asleep = True
        self.events.append("sleep")

    def wake_up(self):
        self.asleep = False
        self.events.append("wake_up")

    def reset_prefix_cache(self):
        self.events.append("reset_prefix_cache")
