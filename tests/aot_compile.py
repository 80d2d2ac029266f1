"""Compile every Triton kernel for an H100 (sm_90) without a GPU: catches what only the compiler
rejects (the interpreter is permissive). Run by test_triton_compile.py with TRITON_INTERPRET unset."""

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from gxpo_kernels.ops import flat_ops
from gxpo_kernels.ops.capo import _capo_q_kernel
from gxpo_kernels.ops.fused_adamw import _adamw_kernel
from gxpo_kernels.ops.grpo_loss import _grpo_loss_fwd_kernel

TARGET = GPUTarget("cuda", 90, 32)


def compile_kernel(fn, signature, constexprs):
    names = fn.arg_names
    src = ASTSource(fn=fn, signature={n: signature.get(n, "constexpr") for n in names},
                    constexprs={(names.index(k),): v for k, v in constexprs.items()})
    kernel = triton.compile(src, target=TARGET)
    assert kernel.asm.get("ptx"), fn.__name__
    print("compiled", fn.__name__, constexprs)


def main():
    for dt, tl_dtype in (("fp32", tl.float32), ("bf16", tl.bfloat16)):
        loss_sig = dict(logits_ptr=f"*{dt}", stride_lb="i64", stride_lt="i64", dlogits_ptr=f"*{dt}", stride_db="i64",
                        stride_dt="i64", ids_ptr="*i64", adv_ptr="*fp32", weight_ptr="*fp32", old_ptr="*fp32",
                        ref_ptr="*fp32", stats_ptr="*fp32", T="i32", V="i32", N="i32", inv_temp="fp32",
                        ratio_lo="fp32", ratio_hi="fp32", dual_c="fp32", beta="fp32",
                        log_ratio_max="fp32")
        for on in (True, False):
            flags = dict(HAS_OLD=on, HAS_REF=on, HAS_DUAL=on, WITH_ENTROPY=on, COMPUTE_GRAD=on, BLOCK_V=4096)
            compile_kernel(_grpo_loss_fwd_kernel, loss_sig, flags)
        tables = dict(numels="*i64", offsets="*i64", block_tensor="*i64", block_start="*i64")
        state = dict(theta0_ptr=f"*{dt}", g0_ptr=f"*{dt}", partial_ptr="*fp32")
        common = {"DTYPE": tl_dtype, "BLOCK": 1024}
        compile_kernel(flat_ops._snapshot_kernel, dict(param_ptrs="*i64", grad_ptrs="*i64", **state, **tables), common)
        compile_kernel(flat_ops._restore_kernel, dict(param_ptrs="*i64", theta0_ptr=f"*{dt}", **tables), common)
        for with_g0 in (True, False):
            compile_kernel(flat_ops._grad_dots_kernel, dict(grad_ptrs="*i64", **state, **tables),
                           {"WITH_G0": with_g0, **common})
        compile_kernel(flat_ops._extrapolate_kernel,
                       dict(param_ptrs="*i64", grad_ptrs="*i64", g1_scale="fp32", alpha="fp32", delta="fp32",
                            scale_max="fp32", **state, **tables), {"K": 5, **common})
        adamw_sig = dict(param_ptrs="*i64", grad_ptrs="*i64", m_ptrs="*i64", v_ptrs="*i64", lr_t="*fp32",
                         wd_t="*fp32", bc1_t="*fp32", bc2_sqrt_t="*fp32", beta1="fp32", beta2="fp32", eps="fp32",
                         grad_scale="fp32", alpha="fp32", delta="fp32", scale_max="fp32", **state, **tables)
        for snapshot, extrapolate in ((True, False), (False, True), (False, False)):
            compile_kernel(_adamw_kernel, adamw_sig, {"SNAPSHOT": snapshot, "EXTRAPOLATE": extrapolate, "K": 5,
                                                      **common})
    compile_kernel(_capo_q_kernel, dict(h_ptr="*fp32", r_ptr="*fp32", rows_ptr="*i64", q_ptr="*fp32", H="i32",
                                        K="i32", stride_h="i64", stride_r="i64"), {"BLOCK_H": 1024})


if __name__ == "__main__":
    main()
