"""Colocated vLLM rollouts: one engine per rank in the trainer's process (TRL's colocate mode).

The engine starts from the model's config (written to config_dir) with dummy weights and no tokenizer
(it gets token ids and returns token ids), and receives the trainer's weights before
its first generate and after every update (`sync_weights`, timed as the `weight_sync` phase). Row j of
a prompt with key s samples with vLLM's per-request seed row_seed(s, j), so rollouts do not depend on
the batch or the rank layout (they differ from the HF engine's: another sampler). With
rollout.vllm_sleep the engine sleeps between generates (weights offloaded, KV cache freed) and wakes
for the next sync. The sampled tokens' log-probs come back as `RolloutBatch.sampled_logp`, the processed
(temperature-scaled, nucleus-renormalized) ones. tests/test_vllm_contract.py checks every name used here
against vLLM 0.33's source."""

import importlib
import os
from functools import reduce
from pathlib import Path

import torch

from .rollout import RolloutBatch, RolloutEngine
from .weights import hf_weight_items

# The engine core in this process (vLLM's in-process client), so that its model is reachable for the
# weight sync; external_launcher sets the same itself.
IN_PROCESS_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
# LLM -> LLMEngine -> executor -> worker wrapper (forwards to the worker) -> model runner -> nn.Module
WORKER_MODEL_ATTRS = ("llm_engine", "model_executor", "driver_worker", "model_runner", "model")


def import_vllm():
    try:
        return importlib.import_module("vllm")
    except ImportError:
        raise ValueError("rollout.engine = 'vllm' needs vLLM (CUDA): pip install vllm, or use rollout.engine = "
                         "'hf'") from None


class VLLMEngine(RolloutEngine):
    def __init__(self, model, tokenizer, cfg, dist, config_dir: Path, seed: int = 0):
        vllm = import_vllm()
        self.vllm, self.model, self.tokenizer, self.cfg = vllm, model, tokenizer, cfg
        if dist.main:  # vLLM reads the architecture from here; weights come from sync, token ids from us
            config_dir.mkdir(parents=True, exist_ok=True)
            model.config.save_pretrained(config_dir)
        dist.barrier()
        # bf16 on GPU like the trainer's compute (FSDP2 keeps fp32 shards; load_weights casts)
        dtype = "bfloat16" if torch.cuda.is_available() else str(next(model.parameters()).dtype).removeprefix("torch.")
        kwargs = dict(load_format="dummy", skip_tokenizer_init=True, tensor_parallel_size=1, seed=seed, dtype=dtype,
                      gpu_memory_utilization=cfg.vllm_gpu_memory_utilization, enable_sleep_mode=cfg.vllm_sleep,
                      enable_prefix_caching=True, logprobs_mode="processed_logprobs")
        if dist.world > 1:
            kwargs["distributed_executor_backend"] = "external_launcher"  # in-process, beside torchrun's ranks
        os.environ.update(IN_PROCESS_ENV)
        self.llm = vllm.LLM(str(config_dir), **kwargs)
        self.asleep = False
        self.sync_weights()

    def _worker_model(self):
        return reduce(getattr, WORKER_MODEL_ATTRS, self.llm)

    @torch.no_grad()
    def sync_weights(self):
        """The trainer's current weights into the engine (every rank gathers each FSDP2 shard)."""
        self._wake()
        target = self._worker_model()
        for name, tensor in hf_weight_items(self.model):
            target.load_weights([(name, tensor)])
        self.llm.reset_prefix_cache()

    def _wake(self):
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def _sample(self, prompts: list, row_seeds: list, temperature=None) -> RolloutBatch:
        self._wake()
        tok, cfg = self.tokenizer, self.cfg
        prompt_ids = tok(prompts, add_special_tokens=False)["input_ids"]
        temperature = cfg.temperature if temperature is None else temperature
        params = [self.vllm.SamplingParams(n=1, temperature=temperature, top_p=cfg.top_p,
                                           max_tokens=cfg.max_new_tokens, seed=seed, logprobs=0,
                                           stop_token_ids=[tok.eos_token_id], detokenize=False)
                  for seed in row_seeds]
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=False)
        if cfg.vllm_sleep:
            self.llm.sleep(level=1)
            self.asleep = True
        device = next(self.model.parameters()).device
        rows, logps = [], []
        for ids, out in zip(prompt_ids, outputs, strict=True):
            sample = out.outputs[0]
            completion = list(sample.token_ids)
            if tok.eos_token_id in completion:  # up to and including the first EOS, as the HF engine
                completion = completion[:completion.index(tok.eos_token_id) + 1]
            logps.append(torch.tensor([entry[t].logprob for entry, t in zip(sample.logprobs, completion, strict=False)],
                                      device=device))
            rows.append((torch.tensor(ids, device=device), torch.tensor(completion, dtype=torch.long, device=device)))
        texts = tok.batch_decode([c for _, c in rows], skip_special_tokens=True)
        return RolloutBatch.from_rows(rows, texts, tok.pad_token_id, logps)
