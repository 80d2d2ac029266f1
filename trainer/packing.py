"""Padding-free micro-batches for the training passes. Each micro-batch is one packed stream [1, L]: the
real tokens of several prompt+completion sequences back to back, position ids restarting at 0 for each,
no attention mask. transformers then builds block-diagonal causal attention for sdpa/eager and uses the
varlen path for flash-attention, so no sequence attends across its neighbours (tested: packed losses and
gradients equal the padded ones). Sequences are bin-packed into micro-batches of at most
max_tokens_per_micro_batch tokens (first fit, longest first); the plan depends only on the batch's
lengths, so every pass of a GXPO/SFPO step reuses it."""

from dataclasses import dataclass

import torch


@dataclass
class PackedMicroBatch:
    rows: torch.Tensor  # [n] batch rows in this micro-batch
    input_ids: torch.Tensor  # [1, L]
    position_ids: torch.Tensor  # [1, L]
    index_nT: torch.Tensor  # [n, T]: stream position of the hidden state predicting completion token t (0 on padding)

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[1]


def sequence_lengths(batch) -> torch.Tensor:
    """Real tokens (prompt + completion) per row."""
    return batch.attention_mask.sum(1)


def plan_bins(lengths: list, budget: int) -> list:
    """Row indices per bin: first fit over rows sorted longest first; budget 0 puts everything in one bin."""
    if budget <= 0:
        return [list(range(len(lengths)))]
    if (too_long := [i for i, n in enumerate(lengths) if n > budget]):
        raise ValueError(f"loss.max_tokens_per_micro_batch = {budget} is smaller than sequence {too_long[0]} "
                         f"({lengths[too_long[0]]} tokens); raise it to at least {max(lengths)}")
    bins, loads = [], []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        slot = next((b for b, load in enumerate(loads) if load + lengths[i] <= budget), None)
        if slot is None:
            bins.append([]), loads.append(0)
            slot = len(bins) - 1
        bins[slot].append(i)
        loads[slot] += lengths[i]
    return [sorted(b) for b in bins]


def pack(batch, budget: int, rows: list | None = None) -> list:
    """The batch's rows (all, or the given ones) as packed micro-batches (see the module docstring)."""
    P, T = batch.prompt_len, batch.completion_ids.shape[1]
    device = batch.input_ids.device
    attention = batch.attention_mask.bool()
    all_lengths = sequence_lengths(batch).tolist()
    chosen = list(range(len(all_lengths))) if rows is None else list(rows)
    micro = []
    for bin_ in plan_bins([all_lengths[r] for r in chosen], budget) if chosen else []:
        rows = [chosen[i] for i in bin_]
        ids, pos, index = [], [], torch.zeros(len(rows), T, dtype=torch.long, device=device)
        offset = 0
        for j, r in enumerate(rows):
            real = batch.input_ids[r][attention[r]]
            prompt_len = int(attention[r, :P].sum())
            ids.append(real)
            pos.append(torch.arange(len(real), device=device))
            n_completion = len(real) - prompt_len
            index[j, :n_completion] = offset + prompt_len - 1 + torch.arange(n_completion, device=device)
            offset += len(real)
        micro.append(PackedMicroBatch(torch.tensor(rows, device=device), torch.cat(ids)[None], torch.cat(pos)[None],
                                      index))
    return micro


def padding_fractions(batch, micro: list | None, rows: list | None = None) -> dict:
    """Share of padding in the padded batch, and in the packed micro-batches (of `rows`, default all) when
    there are some."""
    real = float(batch.attention_mask.sum())
    out = {"pack/padding_frac_padded": 1 - real / batch.attention_mask.numel()}
    if micro is not None:
        packed_real = real if rows is None else float(batch.attention_mask[rows].sum())
        out["pack/padding_frac_packed"] = 1 - packed_real / max(1, sum(m.num_tokens for m in micro))
    return out
