"""The LM-head time model that impl="auto" picks by (loss/lm_head_cost.py), the peers in it
(gxpo_bench/lm_head_peers.py), fp32 precision and deterministic routing. A model of sm_90, not a timing."""

import pytest
import torch

from gxpo_bench import lm_head_peers
from gxpo_kernels import fused_linear_grpo_loss
from gxpo_kernels.devices import H100_SXM, H200, profile_for
from gxpo_kernels.loss import lm_head_cost
from gxpo_kernels.loss.lm_head_kernels import _dot_precision, tile_config

SHAPES = [(N, V, H) for N in (4096, 16384, 65536) for V in (151936, 262144) for H in (1536, 4096)]


@pytest.mark.parametrize("N,V,H", SHAPES)
def test_auto_beats_both_peers_with_a_quarter_of_liger_memory(N, V, H):
    cfg = tile_config(N, V, H, torch.device("cuda"))
    ours = lm_head_cost.choose(H100_SXM, N, V, H, "bf16", cfg)
    assert ours.impl == "chunked" and ours.chunk_tokens <= max(H, 256)
    trl, liger = lm_head_peers.trl(H100_SXM, N, V, H), lm_head_peers.liger(H100_SXM, N, V, H)
    assert ours.seconds <= min(trl.seconds, liger.seconds)
    assert ours.extra_bytes <= liger.extra_bytes / 4
    # the floor: three GEMMs at the dense peak; the model's gap to it is the fit tensor-core efficiency
    floor = lm_head_cost.three_gemms_at_peak(H100_SXM, N, V, H)
    assert 1 / H100_SXM.tensor_efficiency <= ours.seconds / floor < 1.6
    assert ours.bound == "tensor"


def test_tiled_backward_is_bound_by_l2_and_atomics_not_the_tensor_cores():
    N, V, H = 16384, 151936, 1536
    plan = lm_head_cost.tiled(H100_SXM, N, V, H, tile_config(N, V, H, torch.device("cuda")))
    bwd = next(s for s in plan.steps if s.name == "tiled backward")
    assert bwd.times["atomics"] > bwd.times["tensor"] and bwd.times["l2"] > bwd.times["tensor"]
    assert lm_head_cost.choose(H100_SXM, N, V, H, "bf16", None).impl == "chunked"


def test_wave_quantization_and_split_k():
    full = lm_head_cost.gemm(H100_SXM, "", 128 * 132, 256, 64, 0)  # exactly one wave: no loss
    one_more = lm_head_cost.gemm(H100_SXM, "", 128 * 133, 256, 64, 0)  # a second wave of one tile
    assert one_more.times["tensor"] == pytest.approx(2 * full.times["tensor"])  # 1/132 more work, twice the time
    narrow = lm_head_cost.gemm(H100_SXM, "", 1024, 1536, 151936, 0)  # 48 tiles, a long K: split to fill the SMs
    assert narrow.times["tensor"] == pytest.approx(2 * 1024 * 1536 * 151936 / (989.4e12 * H100_SXM.tensor_efficiency))


def test_hbm_term_follows_the_profile():
    copy = 8 << 30
    h200, h100 = (lm_head_cost.memory_pass(dev, "", copy).times["hbm"] for dev in (H200, H100_SXM))
    assert h200 == pytest.approx(h100 * 3.35 / 4.8)
    assert profile_for("NVIDIA H200") is H200 and profile_for("NVIDIA H100 80GB HBM3") is H100_SXM


def test_fp32_follows_torch_matmul_precision():
    before = torch.get_float32_matmul_precision()
    try:
        assert _dot_precision(torch.float32) == "ieee" and lm_head_cost.matmul_dtype(torch.float32, "highest") == "fp32"
        torch.set_float32_matmul_precision("high")
        assert _dot_precision(torch.float32) == "tf32" and lm_head_cost.matmul_dtype(torch.float32, "high") == "tf32"
        assert _dot_precision(torch.bfloat16) == "tf32"  # ignored for bf16: its dots are tensor-core dots
    finally:
        torch.set_float32_matmul_precision(before)
    # fp32 at "highest" has no tensor cores: the model sees FFMA GEMMs, an order of magnitude slower
    fp32 = lm_head_cost.best_chunked(H100_SXM, 4096, 151936, 1536, "fp32").seconds
    assert fp32 > 8 * lm_head_cost.best_chunked(H100_SXM, 4096, 151936, 1536, "bf16").seconds


def test_deterministic_gradients_are_bitwise_repeatable():
    from test_fused_linear_grpo_loss import linear_batch

    batch = linear_batch(3, 9, 24, 70, seed=31)

    def grads():
        h, w = (t.clone().requires_grad_() for t in (batch["hidden"], batch["weight"]))
        fused_linear_grpo_loss(h, w, batch["ids"], batch["adv"], batch["mask"], batch["old"],
                               deterministic=True)[0].backward()
        return h.grad, w.grad

    for a, b in zip(grads(), grads(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="deterministic must be a bool"):
        fused_linear_grpo_loss(batch["hidden"], batch["weight"], batch["ids"], batch["adv"], batch["mask"],
                               deterministic="yes")


def test_profiles_carry_the_calibration_fit_and_the_model_holds_on_published_rows():
    from gxpo_bench import calibration

    fit = calibration.fit_efficiencies()
    for name in ("tensor_efficiency", "hbm_efficiency"):
        assert getattr(H100_SXM, name) == pytest.approx(fit[name], rel=0.01)
        assert getattr(H200, name) == pytest.approx(fit[name], rel=0.01)
    checked = [r for r in calibration.rows() if not r.fit]
    assert len(checked) >= 20
    assert sum(abs(r.error) <= 0.30 for r in checked) >= len(checked) - 1  # the one outlier is shown in the report


def test_gpu_check_dry_run(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "gxpo_bench.gpu_check", "--dry-run", "--reps", "1", "--out",
                           str(tmp_path)], cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (md,) = tmp_path.glob("*-gpu-check-dry-run.md")
    text = md.read_text()
    assert "Dry run: CPU timings" in text
    for case in ("ours auto", "ours chunked, deterministic", "TRL 1.16 fused head", "Liger 0.8.5 fused linear GRPO",
                 "grpo_loss ours", "grpo_loss Liger", "flat snapshot", "flat extrapolate"):
        assert f"| {case} |" in text, case
    for case in ("grpo_loss ours", "flat snapshot", "flat extrapolate"):  # ours must run, not be skipped
        assert f"| {case} | skipped" not in text, case


def test_gpu_check_profiles_each_ncu_case_with_clocks_left_alone():
    from gxpo_bench import gpu_check

    for case in gpu_check.NCU_CASES:
        cmd = gpu_check.ncu_command(case)
        assert cmd[:3] == ["ncu", "--clock-control", "none"] and cmd[-2:] == ["--one", case]
        assert "lts__t_sectors_op_red.sum" in cmd[cmd.index("--metrics") + 1]
    assert "--section" in gpu_check.ncu_command("ours auto", metrics=None)
