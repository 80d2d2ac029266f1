"""The gate against the GXPO authors' own code (github SwapniL-afk-now/final-gxpo at 1a301e16), re-derived here
from their files and run side by side with ours on the same statistic sequences, decisions and z-scores to
1e-10:

- their trainer's entropy gate (Code/SFPO/verl/trainer/ppo/ray_trainer.py, RayPPOTrainer.fit), the default:
  at outer step t it scores C[-1] (step t - 1's entropy) against C[-W:] (C[-1] among them), mean and
  np.std, z >= tau for `patience` steps in a row stops GXPO from step t on, for good; steps t <= warmup are
  never gated, and with the reset the history is cleared at the first gated step;
- their actor's gate (Code/SFPO/verl/workers/actor/gxpo_state.py at d2afd2cf, GXPOState.update_stats and
  check_trigger): the statistic against the preceding W observations, mean / population std or, robust,
  median / max(1.4826 MAD, 0.1 |median|), the baseline frozen at a streak's first violation."""

import statistics

import numpy as np
import pytest

from gxpo_kernels.optim.gate import ZScoreGate


def authors_trainer_gate(entropies, W, tau, patience, warmup, reset):
    """[(runs_gxpo, z or None)] per outer step t = 1.. (entropies[t - 1] is step t's corrective entropy)."""
    C, stop, streak, reset_done, out = [], False, 0, False, []
    P = max(1, patience)
    for t, e_t in enumerate(entropies, start=1):
        enabled = t > warmup
        stat = C[-1] if C else 0.0
        if enabled and reset and not reset_done:
            C.clear()
            reset_done, streak, stat = True, 0, 0.0
        ready = W > 0 and len(C) >= W
        z = None
        if enabled and ready and not stop:
            win = C[-W:]
            z = (stat - float(np.mean(win))) / (float(np.std(win)) + 1e-9)
            streak = streak + 1 if z >= tau else 0
            if streak >= P:
                stop = True
        elif stop:
            streak = 0
        out.append((not stop, z))
        C.append(e_t)
    return out


def ours_inclusive(entropies, W, tau, patience, warmup, reset):
    gate = ZScoreGate("window_inclusive", tau=tau, window=W, patience=patience, warmup=warmup, warmup_reset=reset)
    out = []
    for e in entropies:
        runs_gxpo = gate.open
        z = gate.observe(e) if runs_gxpo else None
        out.append((runs_gxpo, z))
    return out


def entropy_sequence(seed, n=160):
    """Noisy entropies that drift upward after a while (so that the gate trips somewhere), with spikes."""
    rng = np.random.default_rng(seed)
    e = 1.0 + 0.02 * rng.standard_normal(n)
    start = int(rng.integers(20, 120))
    e[start:] += 0.01 * np.arange(n - start) ** 1.5
    e[rng.integers(0, n, 3)] += 0.2
    return [float(x) for x in e]


CASES = [  # (W, tau, patience, warmup, reset): the authors' default, their 7B launcher's, small windows
    (30, 3.0, 3, 50, True), (30, 1.5, 2, 50, False), (3, 1.0, 2, 0, True), (5, 1.2, 1, 7, False),
    (5, 1.2, 3, 7, True), (30, 2.0, 1, 0, True),
]


@pytest.mark.parametrize("case", CASES, ids=[f"W{c[0]}-tau{c[1]}-p{c[2]}-wu{c[3]}-reset{int(c[4])}" for c in CASES])
@pytest.mark.parametrize("seed", range(6))
def test_window_inclusive_gate_equals_the_authors_trainer(case, seed):
    entropies = entropy_sequence(seed)
    theirs, ours = authors_trainer_gate(entropies, *case), ours_inclusive(entropies, *case)
    assert [m for m, _ in ours] == [m for m, _ in theirs]
    # their step t scores step t - 1's entropy: our observation after step t - 1
    for t in range(2, len(entropies) + 1):
        z_theirs, z_ours = theirs[t - 1][1], ours[t - 2][1]
        if z_theirs is not None:
            assert z_ours == pytest.approx(z_theirs, abs=1e-10, rel=1e-10), t


def test_the_authors_default_gate_by_hand():
    """Warm-up 50 with the reset, window 30, patience 3: the first score is after step 80 (window e51..e80),
    and three violations in a row at the earliest make step 83 the first plain step."""
    entropies = [1.0 + 0.001 * (i % 7) for i in range(79)] + [5.0, 6.0, 7.0] + [1.0] * 10
    ours = ours_inclusive(entropies, 30, 3.0, 3, 50, True)
    assert [t for t, (_, z) in enumerate(ours, start=1) if z not in (None, 0.0)][0] == 80
    assert [m for m, _ in ours].index(False) + 1 == 83
    window = entropies[50:80]
    expected = (entropies[79] - np.mean(window)) / (np.std(window) + 1e-9)
    assert ours[79][1] == pytest.approx(expected, rel=1e-12)


def test_the_helpers_small_example():
    """W = 3, tau = 1, patience 2: z = 1.414 after step 3, 1.408 after step 4, so step 5 is a plain step."""
    ours = ours_inclusive([1.0, 1.0, 1.1, 2.0, 3.0], 3, 1.0, 2, 0, True)
    assert [m for m, _ in ours] == [True, True, True, True, False]
    assert ours[2][1] == pytest.approx((1.1 - np.mean([1.0, 1.0, 1.1])) / (np.std([1.0, 1.0, 1.1]) + 1e-9), rel=1e-12)
    assert ours[2][1] == pytest.approx(1.414, abs=1e-3) and ours[3][1] == pytest.approx(1.408, abs=1e-3)
    assert ours[3][1] == pytest.approx((2.0 - np.mean([1.0, 1.1, 2.0])) / (np.std([1.0, 1.1, 2.0]) + 1e-9), rel=1e-12)


def authors_state_gate(stats, W, tau, patience, robust):
    """GXPOState's z path (warmup_steps 0): [(trips_now, z)] per observation."""
    history, frozen, streak, tripped, out = [], None, 0, False, []
    for h in stats:
        window = history[-W:]
        if len(window) < W:
            history.append(h)
            out.append((False, 0.0))
            continue
        if frozen is not None:
            mu, sigma = frozen
        elif robust:
            mu = statistics.median(window)
            sigma = max(1.4826 * statistics.median([abs(x - mu) for x in window]), 0.10 * abs(mu))
        else:
            mu = sum(window) / W
            sigma = (sum((x - mu) ** 2 for x in window) / W) ** 0.5
        z = (h - mu) / (sigma + 1e-9)
        history.append(h)
        trips_now = False
        if not tripped:
            if z >= tau:
                if streak == 0:
                    frozen = (mu, sigma)
                streak += 1
                if streak >= patience:
                    tripped = trips_now = True
            else:
                streak, frozen = 0, None
        out.append((trips_now, z))
    return out


@pytest.mark.parametrize("robust", [False, True])
@pytest.mark.parametrize("patience", [1, 3])
@pytest.mark.parametrize("seed", range(4))
def test_window_gate_equals_the_authors_actor_gate(robust, patience, seed):
    stats = entropy_sequence(seed)
    theirs = authors_state_gate(stats, 10, 2.0, patience, robust)
    gate = ZScoreGate("window", tau=2.0, window=10, patience=patience, robust=robust)
    for i, h in enumerate(stats):
        was_open = gate.open
        z = gate.observe(h)
        trips_now, z_theirs = theirs[i]
        assert z == pytest.approx(z_theirs, abs=1e-10, rel=1e-10), i
        assert (was_open and not gate.open) == trips_now, i
        if not gate.open:
            break
    assert any(t for t, _ in theirs), "the sequence should trip the gate"


def test_robust_statistics_by_hand():
    """Window [1, 2, 3, 4, 100]: median 3, MAD median(2, 1, 0, 1, 97) = 1, sigma = max(1.4826, 0.3)."""
    gate = ZScoreGate("window", tau=100.0, window=5, robust=True)
    for h in (1.0, 2.0, 3.0, 4.0, 100.0):
        gate.observe(h)
    assert gate.observe(10.0) == pytest.approx((10.0 - 3.0) / (1.4826 + 1e-9), rel=1e-12)
    flat = ZScoreGate("window", tau=100.0, window=4, robust=True)  # MAD 0: the 0.1 |median| floor
    for h in (2.0, 2.0, 2.0, 2.0):
        flat.observe(h)
    assert flat.observe(3.0) == pytest.approx(1.0 / (0.2 + 1e-9), rel=1e-12)


def test_warmup_without_reset_keeps_the_warmup_observations():
    """No reset: the window holds warm-up observations, and the observation after step `warmup` can trip."""
    gate = ZScoreGate("window_inclusive", tau=1.0, window=3, warmup=4, warmup_reset=False)
    zs = [gate.observe(h) for h in (1.0, 1.0, 1.0)]
    assert gate.open and zs[-1] == 0.0  # the third fills the window: scored 0 (no spread), no trip anyway
    assert gate.observe(5.0) > 1.0 and not gate.open  # the 4th observation: after step 4 = warmup


def test_warmup_with_reset_restarts_the_history():
    gate = ZScoreGate("window_inclusive", tau=1.0, window=3, warmup=4, warmup_reset=True)
    for h in (1.0, 1.0, 1.0, 5.0):  # the warm-up's observations are dropped, the spike among them
        assert gate.observe(h) == 0.0
    assert gate.open and len(gate.history) == 0


@pytest.mark.parametrize("kwargs,message", [
    ({"kind": "window_inclusive", "robust": True}, "robust must be false, or true with gate = 'window'"),
    ({"warmup_reset": 1}, "warmup_reset must be true or false"),
])
def test_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ZScoreGate(**kwargs)
