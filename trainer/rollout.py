"""The rollout batch and the HF-generate engine (the default); trainer/engines.py picks the engine, and
the vLLM engine (trainer/vllm_engine.py) builds on this module."""

import dataclasses
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
    sampled_logp: torch.Tensor | None = None  # [B, T]: the engine's log-probs of the sampled tokens, if it has them

    @property
    def position_ids(self):
        return (self.attention_mask.long().cumsum(-1) - 1).clamp(min=0)

    def rows(self) -> list:
        """Per row: (prompt token ids, completion token ids), unpadded."""
        P = self.prompt_len
        return [(ids[:P][am[:P]], comp[m]) for ids, am, comp, m in
                zip(self.input_ids, self.attention_mask.bool(), self.completion_ids, self.completion_mask, strict=True)]

    def row_logps(self) -> list | None:
        """Per row: sampled_logp over the completion's tokens (None when the engine gave none)."""
        if self.sampled_logp is None:
            return None
        return [logp[m] for logp, m in zip(self.sampled_logp, self.completion_mask, strict=True)]

    @staticmethod
    def from_rows(rows: list, texts: list, pad_id: int, logps: list | None = None) -> "RolloutBatch":
        """Rows of (prompt ids, completion ids): prompts left-padded, completions right-padded; logps
        (one tensor per completion) become sampled_logp."""
        P = max(len(p) for p, _ in rows)
        T = max(1, max(len(c) for _, c in rows))
        B = len(rows)
        device = rows[0][0].device
        input_ids = torch.full((B, P + T), pad_id, dtype=torch.long, device=device)
        attention = torch.zeros(B, P + T, dtype=torch.bool, device=device)
        for i, (p, c) in enumerate(rows):
            input_ids[i, P - len(p):P], attention[i, P - len(p):P] = p, True
            input_ids[i, P:P + len(c)], attention[i, P:P + len(c)] = c, True
        sampled_logp = None
        if logps is not None:
            sampled_logp = torch.zeros(B, T, device=device)
            for i, logp in enumerate(logps):
                sampled_logp[i, :len(logp)] = logp
        return RolloutBatch(input_ids, attention, P, input_ids[:, P:].clone(), attention[:, P:].clone(), list(texts),
                            sampled_logp)

    @staticmethod
    def concat(batches: list, pad_id: int) -> "RolloutBatch":
        rows = [r for b in batches for r in b.rows()]
        logps = [b.row_logps() for b in batches]
        logps = None if any(x is None for x in logps) else [x for part in logps for x in part]
        return RolloutBatch.from_rows(rows, [t for b in batches for t in b.texts], pad_id, logps)

    def row_slice(self, start: int, stop: int) -> "RolloutBatch":
        """Rows start:stop (views), padded as the whole batch is (the same prompt_len and width)."""
        B = self.completion_ids.shape[0]

        def rows(v):
            return v[start:stop] if isinstance(v, list) or (torch.is_tensor(v) and v.dim() and v.shape[0] == B) else v

        return dataclasses.replace(self, **{f.name: rows(getattr(self, f.name)) for f in dataclasses.fields(self)})

    def select(self, order: list, pad_id: int) -> "RolloutBatch":
        """The rows in `order` (a permutation or subset), re-padded."""
        rows, logps = self.rows(), self.row_logps()
        return RolloutBatch.from_rows([rows[i] for i in order], [self.texts[i] for i in order], pad_id,
                                      None if logps is None else [logps[i] for i in order])


def completion_mask_from(completion_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """True up to and including the first EOS of each row."""
    is_eos = completion_ids == eos_token_id
    eos_before = is_eos.long().cumsum(-1) - is_eos.long()
    return eos_before == 0


class RolloutEngine:
    """What every engine shares: groups of keyed rows. An engine implements _sample(prompts, row_seeds)."""

    def generate(self, prompts: list, group_size: int, prompt_keys: list, temperature=None) -> RolloutBatch:
        """group_size completions of each prompt; completion j of the prompt with key s from row_seed(s, j).
        temperature: this call's sampling temperature (None: the engine's)."""
        if len(prompt_keys) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(prompt_keys)} prompt keys")
        return self.generate_rows([p for p in prompts for _ in range(group_size)],
                                  [row_seed(key, j) for key in prompt_keys for j in range(group_size)], temperature)

    def generate_rows(self, prompts: list, row_seeds: list, temperature=None) -> RolloutBatch:
        """One completion per (prompt text, row seed)."""
        if not prompts or len(prompts) != len(row_seeds):
            raise ValueError(f"generate_rows needs one seed per prompt, got {len(prompts)} prompts and "
                             f"{len(row_seeds)} seeds")
        return self._sample(prompts, row_seeds, temperature)

    def _sample(self, prompts: list, row_seeds: list, temperature=None) -> RolloutBatch:
        raise NotImplementedError


class HFGenerateEngine(RolloutEngine):
    """transformers generate through the PolicyRunner. Completion j of a prompt with key s samples from
    row_seed(s, j): the same tokens whatever the batch, the padding or the number of ranks; their log-probs under
    the distribution they were drawn from come back as sampled_logp (the rollout correction's). Under FSDP2
    (world > 1) ranks keep stepping until all are done (synced_gpus), as every forward is collective."""

    def __init__(self, runner, tokenizer, max_new_tokens, temperature, top_p, world=1):
        self.runner, self.tokenizer, self.world = runner, tokenizer, world
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p

    @torch.no_grad()
    def _sample(self, prompts: list, row_seeds: list, temperature=None) -> RolloutBatch:
        tok = self.tokenizer
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        device = next(self.runner.parameters()).device
        enc = {k: v.to(device) for k, v in enc.items()}
        seeds_B = torch.tensor(row_seeds, dtype=torch.int64)
        sampler = RowKeyedSampler(seeds_B, self.temperature if temperature is None else temperature, self.top_p)
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
        sampled_logp = torch.stack(sampler.logps[:completion_ids.shape[1]], dim=1).float() * mask
        return RolloutBatch(torch.cat([enc["input_ids"], completion_ids], dim=1), attention_mask, prompt_len,
                            completion_ids, mask, texts, sampled_logp)
