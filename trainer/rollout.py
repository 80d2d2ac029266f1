"""Rollout engines: sample completions for a batch of prompts. HF generate is the default; the vLLM
engine is import-guarded (GPU extra) and not built yet."""

from dataclasses import dataclass

import torch

from .sampling import RowKeyedSampler, row_seed


@dataclass
class RolloutBatch:
    input_ids: torch.Tensor  # [B, P + T]: left-padded prompt, then the completion (right-padded)
    attention_mask: torch.Tensor  # [B, P + T]
    prompt_len: int  # P
    completion_ids: torch.Tensor  # [B, T]
    completion_mask: torch.Tensor  # [B, T] bool: sampled tokens up to and including the first EOS
    texts: list  # decoded completions

    @property
    def position_ids(self):
        return (self.attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def completion_mask_from(completion_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """True up to and including the first EOS of each row."""
    is_eos = completion_ids == eos_token_id
    eos_before = is_eos.long().cumsum(-1) - is_eos.long()
    return eos_before == 0


class HFGenerateEngine:
    """transformers generate through the PolicyRunner. Completion j of a prompt with key s samples from
    row_seed(s, j): the same tokens whatever the batch, the padding or the number of ranks. Under FSDP2
    (world > 1) ranks keep stepping until all are done (synced_gpus), as every forward is collective."""

    def __init__(self, runner, tokenizer, max_new_tokens, temperature, top_p, world=1):
        self.runner, self.tokenizer, self.world = runner, tokenizer, world
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p

    @torch.no_grad()
    def generate(self, prompts: list, group_size: int, prompt_keys: list) -> RolloutBatch:
        if len(prompt_keys) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(prompt_keys)} prompt keys")
        tok = self.tokenizer
        enc = tok([p for p in prompts for _ in range(group_size)], return_tensors="pt", padding=True,
                  add_special_tokens=False)
        device = next(self.runner.parameters()).device
        enc = {k: v.to(device) for k, v in enc.items()}
        seeds_B = torch.tensor([row_seed(key, j) for key in prompt_keys for j in range(group_size)])
        sampler = RowKeyedSampler(seeds_B, self.temperature, self.top_p)
        was_training = self.runner.training
        self.runner.eval()
        out = self.runner("generate", **enc, do_sample=False, logits_processor=[sampler], temperature=None,
                          top_p=None, top_k=None, max_new_tokens=self.max_new_tokens, pad_token_id=tok.pad_token_id,
                          eos_token_id=tok.eos_token_id, synced_gpus=self.world > 1)
        self.runner.train(was_training)
        prompt_len = enc["input_ids"].shape[1]
        completion_ids = out[:, prompt_len:]
        if completion_ids.shape[1] == 0:
            raise RuntimeError("generation produced no tokens")
        mask = completion_mask_from(completion_ids, tok.eos_token_id)
        completion_ids = torch.where(mask, completion_ids, tok.pad_token_id)
        texts = tok.batch_decode(completion_ids, skip_special_tokens=True)
        attention_mask = torch.cat([enc["attention_mask"].bool(), mask], dim=1)
        return RolloutBatch(torch.cat([enc["input_ids"], completion_ids], dim=1), attention_mask, prompt_len,
                            completion_ids, mask, texts)


def make_engine(kind, runner, tokenizer, cfg, world=1):
    if kind == "vllm":
        raise NotImplementedError("the vLLM rollout engine is not built yet; use rollout.engine = 'hf'")
    return HFGenerateEngine(runner, tokenizer, cfg.max_new_tokens, cfg.temperature, cfg.top_p, world)
