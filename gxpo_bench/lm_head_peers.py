"""The peers' fused LM heads in the time model of gxpo_kernels/loss/lm_head_cost.py, step by step as their
sources run them (read from the installed release wheels; the op lists below cite the lines that settle
each step). Modelled like ours, on the same profile, in the same run: a model of the chip, not a timing."""

import math

from gxpo_kernels.loss.lm_head_cost import Plan, chunks, gemm, memory_pass

TRL_TOKEN_CHUNK, TRL_VOCAB_CHUNK = 4096, 32768  # trl/kernels/chunked_logprob.py TOKEN_CHUNK_SIZE; trainer/utils.py
LIGER_TILE_TOKENS, LIGER_TILE_VOCAB = 2048, 4096  # liger_kernel/chunked_loss/fused_linear_ppo.py tiles
LIGER_ELEMENTWISE_BYTES_PER_LOGIT = 40  # its ~6 eager fp32 element-wise kernels per logit tile, unfused


def trl(dev, N: int, V: int, H: int, e: int = 2) -> Plan:
    """TRL 1.16 ChunkedLogProbFunction (GRPOTrainer's fused head): hidden[mask] gathered; per [4096 x 32768]
    tile the forward's bf16 GEMM into a reused buffer and a Triton fold (read once); the backward recomputes
    the tile, a Triton kernel writes bf16 dlogits in place, and two bf16 GEMMs add into fp32 d_hidden and
    d_weight (torch.addmm(out_dtype=float32)); fp32 accumulators cast at the end."""
    plan = Plan("trl", TRL_TOKEN_CHUNK, extra_bytes=4 * (V + N) * H + min(N, TRL_TOKEN_CHUNK) * TRL_VOCAB_CHUNK * e
                + N * H * e)
    plan.steps.append(memory_pass(dev, "hidden[mask] gather (+ its backward scatter into zeros)", 5 * N * H * e))
    plan.steps.append(memory_pass(dev, "zero fp32 d_hidden, d_weight", 4 * (N + V) * H))
    for c, nc in chunks(N, TRL_TOKEN_CHUNK):
        for v, nv in chunks(V, TRL_VOCAB_CHUNK):
            k, tile = nc * nv, c * v * e
            plan.steps += [
                gemm(dev, "fwd logits GEMM", c, v, H, c * H * e + v * H * e + tile, count=k),
                memory_pass(dev, "fwd fold kernel (read)", tile, count=k),
                gemm(dev, "bwd recompute GEMM", c, v, H, c * H * e + v * H * e + tile, count=k),
                memory_pass(dev, "bwd dlogits kernel (read + write)", 2 * tile, count=k),
                gemm(dev, "d_hidden GEMM (fp32 out, +=)", c, H, v, tile + v * H * e + 2 * c * H * 4, count=k),
                gemm(dev, "d_weight GEMM (fp32 out, +=)", v, H, c, tile + c * H * e + 2 * v * H * 4, count=k),
            ]
    plan.steps.append(memory_pass(dev, "fp32 -> bf16 casts of both gradients", (N + V) * H * (4 + e)))
    return plan


def liger(dev, N: int, V: int, H: int, T: int = 1024, e: int = 2) -> Plan:
    """Liger-Kernel 0.8.5 LigerFusedLinearGRPOLoss (chunk_size = 1 sequence of T tokens, every position): per
    [<= 2048 x 4096] tile a bf16 logits GEMM and fp32 element-wise work in eager torch; in the same forward
    an autograd.grad per chunk recomputes the logits, forms fp32 dlogits and runs d_input and d_weight as
    fp32 x fp32 matmuls (torch's default: no tf32) on fp32 copies of the weight and hidden slices; per chunk
    a fp32 [V, H] buffer is zeroed, cast and added into the weight-dtype gradient."""
    plan = Plan("liger", T, extra_bytes=8 * V * H)
    sequences = math.ceil(N / T)
    for c, nc in chunks(min(T, N), LIGER_TILE_TOKENS):
        for v, nv in chunks(V, LIGER_TILE_VOCAB):
            k, tile = sequences * nc * nv, c * v
            plan.steps += [
                gemm(dev, "logits GEMM (bf16)", c, v, H, (c + v) * H * e + tile * e, count=k),
                memory_pass(dev, "fp32 element-wise loss math", LIGER_ELEMENTWISE_BYTES_PER_LOGIT * tile, count=k),
                gemm(dev, "recompute GEMM (bf16)", c, v, H, (c + v) * H * e + tile * e, count=k),
                memory_pass(dev, "fp32 dlogits, fp32 copies of the weight and hidden slices",
                            3 * tile * 4 + (v + c) * H * (e + 4), count=k),
                gemm(dev, "d_input GEMM (fp32)", c, H, v, tile * 4 + v * H * 4 + 2 * c * H * 4, "fp32", count=k),
                gemm(dev, "d_weight GEMM (fp32)", v, H, c, tile * 4 + c * H * 4 + 2 * v * H * 4, "fp32", count=k),
            ]
    plan.steps.append(memory_pass(dev, "per chunk: fp32 [V, H] zeroed, cast, added", 16 * V * H, count=sequences))
    return plan
