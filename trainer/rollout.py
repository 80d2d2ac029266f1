"""Rollout engines: sample completions for a batch of prompts. HF generate is the default; the vLLM
engine is import-guarded (GPU extra) and not built yet."""

from dataclasses import dataclass

import torch


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
    def __init__(self, model, tokenizer, max_new_tokens, temperature, top_p):
        self.model, self.tokenizer = model, tokenizer
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p

    @torch.no_grad()
    def generate(self, prompts: list, group_size: int) -> RolloutBatch:
        tok = self.tokenizer
        enc = tok([p for p in prompts for _ in range(group_size)], return_tensors="pt", padding=True,
                  add_special_tokens=False)
        device = next(self.model.parameters()).device
        enc = {k: v.to(device) for k, v in enc.items()}
        was_training = self.model.training
        self.model.eval()
        out = self.model.generate(**enc, do_sample=True, temperature=self.temperature, top_p=self.top_p, top_k=0,
                                  max_new_tokens=self.max_new_tokens, pad_token_id=tok.pad_token_id,
                                  eos_token_id=tok.eos_token_id)
        self.model.train(was_training)
        prompt_len = enc["input_ids"].shape[1]
        completion_ids = out[:, prompt_len:]
        if completion_ids.shape[1] == 0:
            raise RuntimeError("generation produced no tokens")
        mask = completion_mask_from(completion_ids, tok.eos_token_id)
        completion_ids = torch.where(mask, completion_ids, tok.pad_token_id)
        texts = tok.batch_decode(torch.where(mask, completion_ids, tok.pad_token_id), skip_special_tokens=True)
        attention_mask = torch.cat([enc["attention_mask"].bool(), mask], dim=1)
        return RolloutBatch(torch.cat([enc["input_ids"], completion_ids], dim=1), attention_mask, prompt_len,
                            completion_ids, mask, texts)


def make_engine(kind, model, tokenizer, cfg):
    if kind == "vllm":
        raise NotImplementedError("the vLLM rollout engine is not built yet; use rollout.engine = 'hf'")
    return HFGenerateEngine(model, tokenizer, cfg.max_new_tokens, cfg.temperature, cfg.top_p)
