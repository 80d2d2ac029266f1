"""PolicyRunner: every use of the policy goes through one module's forward (sampling, a loss pass,
log-probs). Under FSDP2 it is the root, so its forward gathers the root's parameters (embeddings,
final norm, LM head) that the fused loss reads directly; with one process it is a thin wrapper."""

import torch

from gxpo_kernels import fused_linear_grpo_loss
from gxpo_kernels.loss import fused_linear_token_logprobs


def decoder_and_head(model):
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    return decoder, model.get_output_embeddings()


class PolicyRunner(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, kind: str, *args, **kwargs):
        if kind == "generate":
            return self.model.generate(*args, **kwargs)
        if kind == "token_loss":
            return self._token_loss(*args, **kwargs)
        if kind == "packed_token_loss":
            return self._packed_token_loss(*args, **kwargs)
        if kind == "token_logprobs":
            return self._token_logprobs(*args, **kwargs)
        if kind == "zero_loss":
            return self._zero_loss()
        if kind == "completion_hidden":
            return self._completion_hidden(*args, **kwargs)
        raise ValueError(f"unknown PolicyRunner call {kind!r}")

    def _packed_token_loss(self, batch, packed, advantages_B, **loss_kwargs):
        """The same loss over a packed micro-batch (trainer/packing.py): the decoder runs on the packed
        stream only; the completion tokens' hidden states are gathered back into [n, T] rows."""
        hidden, head = self._packed_hidden(packed)
        rows = packed.rows
        return fused_linear_grpo_loss(hidden, head.weight, batch.completion_ids[rows],
                                      advantages_B, batch.completion_mask[rows],
                                      lm_head_bias_V=getattr(head, "bias", None), **loss_kwargs)

    def _token_logprobs(self, batch, rows, packed=None, temperature=1.0):
        """(logp [n, T], entropy [n, T]) of the completion tokens of batch[rows] (packed: that packed micro-batch,
        rows = packed.rows), differentiable, through the vocabulary primitive: the objective is then torch on
        these vectors (gxpo_kernels.loss.policy_loss)."""
        hidden, head = self._completion_hidden(batch, rows) if packed is None else self._packed_hidden(packed)
        return fused_linear_token_logprobs(hidden, head.weight, batch.completion_ids[rows], batch.completion_mask[rows],
                                           lm_head_bias_V=getattr(head, "bias", None), temperature=temperature)

    def _packed_hidden(self, packed):
        """(final hidden states [n, T, H] of a packed micro-batch's completion tokens, the LM head module)."""
        decoder, head = decoder_and_head(self.model)
        hidden_LH = decoder(input_ids=packed.input_ids, position_ids=packed.position_ids,
                            use_cache=False).last_hidden_state[0]
        return hidden_LH[packed.index_nT], head

    def _zero_loss(self):
        """A loss of 0 that runs every layer: the pass a rank makes when it has fewer micro-batches than
        another, so that the FSDP2 collectives of forward and backward still match."""
        decoder, head = decoder_and_head(self.model)
        ids = torch.zeros(1, 1, dtype=torch.long, device=head.weight.device)
        hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state
        return 0.0 * (hidden.sum() + head.weight.sum())

    def _completion_hidden(self, batch, rows: slice = slice(None)):
        """(final hidden states [B, T, H] that predict each completion token, the LM head module)."""
        decoder, head = decoder_and_head(self.model)
        hidden = decoder(input_ids=batch.input_ids[rows], attention_mask=batch.attention_mask[rows],
                         position_ids=batch.position_ids[rows], use_cache=False).last_hidden_state
        P, T = batch.prompt_len, batch.completion_ids.shape[1]
        return hidden[:, P - 1:P - 1 + T], head

    def _token_loss(self, batch, rows: slice, advantages_B, **loss_kwargs):
        """fused_linear_grpo_loss over the completion tokens of batch[rows]: (loss, metrics)."""
        hidden, head = self._completion_hidden(batch, rows)
        return fused_linear_grpo_loss(hidden, head.weight, batch.completion_ids[rows],
                                      advantages_B, batch.completion_mask[rows],
                                      lm_head_bias_V=getattr(head, "bias", None), **loss_kwargs)

    @torch.no_grad()
    def logp(self, batch, temperature: float) -> torch.Tensor:
        """Per-token log-probs [B, T] of the sampled completions (no gradient)."""
        zeros = torch.zeros(batch.completion_ids.shape[0], device=batch.input_ids.device)
        _, metrics = self("token_loss", batch, slice(None), zeros, temperature=temperature)
        return metrics["logp_BT"]
