"""The z-score gate against hand-computed sequences."""

import math

import pytest

from gxpo_kernels.optim.gate import ZScoreGate


def test_ema_statistics_by_hand():
    gate = ZScoreGate("ema", tau=0.5, omega=0.1)
    # step 1: mu = sigma = 1; H = 1.3 -> Z = 0.3; sigma^2 = 0.9 + 0.1 * 0.09 = 0.909; mu = 1.03
    assert gate.observe(1.3) == pytest.approx(0.3)
    assert gate.sigma == pytest.approx(math.sqrt(0.909)) and gate.mu == pytest.approx(1.03)
    # step 2: H = 1.2 -> Z = 0.17 / sqrt(0.909); sigma^2 = 0.9 * 0.909 + 0.1 * 0.17^2; mu = 1.047
    assert gate.observe(1.2) == pytest.approx(0.17 / math.sqrt(0.909))
    assert gate.sigma == pytest.approx(math.sqrt(0.8181 + 0.00289)) and gate.mu == pytest.approx(1.047)
    assert gate.open


def test_ema_sigma_floor_and_spike_trips_at_the_right_step():
    gate = ZScoreGate("ema", tau=0.5, omega=0.1)
    for _ in range(200):  # constant H = 1: sigma decays to its floor 0.01
        assert gate.observe(1.0) == pytest.approx(0.0, abs=1e-12)
    assert gate.sigma == pytest.approx(0.01)
    assert gate.observe(1.004) == pytest.approx(0.4, rel=1e-6) and gate.open  # |Z| < tau
    gate = ZScoreGate("ema", tau=0.5)
    for _ in range(200):
        gate.observe(1.0)
    assert gate.observe(1.006) == pytest.approx(0.6, rel=1e-6)
    assert not gate.open  # |Z| >= tau: tripped on this step


def test_ema_trips_on_a_drop_too():
    gate = ZScoreGate("ema", tau=0.5)
    gate.observe(0.4)  # Z = -0.6
    assert not gate.open


def test_ema_onesided_skips_two_observations_and_ignores_drops():
    gate = ZScoreGate("ema_onesided", tau=0.5, omega=0.1)
    assert gate.observe(30.0) == 0.0 and gate.observe(30.0) == 0.0 and gate.open  # paper-era EMA: z = 29 here
    # both updated the EMA: mu = 1 -> 3.9 -> 6.51; sigma^2 = 0.9 + 0.1 * 29^2 = 85, then 0.9 * 85 + 0.1 * 26.1^2
    assert gate.mu == pytest.approx(6.51)
    sigma = math.sqrt(0.9 * 85.0 + 0.1 * 26.1**2)
    assert gate.sigma == pytest.approx(sigma)
    assert gate.observe(0.0) == pytest.approx(-6.51 / (sigma + 1e-8)) and gate.open  # a drop never trips
    assert gate.observe(1e6) > 0.5 and not gate.open


def test_ema_warmup_updates_but_cannot_trip():
    gate = ZScoreGate("ema", tau=0.5, warmup=2)
    assert gate.observe(30.0) == pytest.approx(29.0) and gate.open  # would trip without the warm-up
    gate.observe(30.0)
    assert gate.open and gate.mu == pytest.approx(6.51)
    gate.observe(30.0)  # z = 23.49 / sigma > 0.5: the first step after warm-up trips
    assert not gate.open


def test_window_scores_against_the_preceding_full_window():
    gate = ZScoreGate("window", tau=1.0, window=3)
    assert [gate.observe(h) for h in (1.0, 2.0, 3.0)] == [0.0, 0.0, 0.0] and gate.open  # 3 earlier needed
    z = gate.observe(2.5)  # preceding [1, 2, 3]: mean 2, population std sqrt(2/3)
    assert z == pytest.approx(0.5 / (math.sqrt(2 / 3) + 1e-9)) and gate.open
    z = gate.observe(5.0)  # preceding [2, 3, 2.5]: mean 2.5, std sqrt(1/6)
    assert z == pytest.approx(2.5 / math.sqrt(1 / 6)) and not gate.open


def test_window_patience_keeps_the_streaks_first_baseline():
    gate = ZScoreGate("window", tau=1.0, window=3, patience=2)
    for h in (1.0, 2.0, 3.0):
        gate.observe(h)
    z1 = gate.observe(4.0)  # against [1, 2, 3]: 2 / sqrt(2/3) = 2.45: streak opens, baseline frozen
    assert z1 == pytest.approx(2.0 / math.sqrt(2 / 3)) and gate.open
    z2 = gate.observe(3.0)  # still against mean 2, std sqrt(2/3) (the live window [2, 3, 4] would give 0)
    assert z2 == pytest.approx(1.0 / math.sqrt(2 / 3)) and not gate.open


def test_window_is_one_sided():
    gate = ZScoreGate("window", tau=2.0, window=4)
    for h in (1.0, 2.0, 1.0, 2.0):
        gate.observe(h)
    assert gate.observe(-100.0) < 0 and gate.open


def test_window_inclusive_scores_once_the_window_holds_the_current_value():
    gate = ZScoreGate("window_inclusive", tau=1.0, window=3)
    assert gate.observe(1.0) == 0.0 and gate.observe(2.0) == 0.0 and gate.open
    z = gate.observe(3.0)  # [1, 2, 3] including 3: mean 2, std sqrt(2/3)
    assert z == pytest.approx(1.0 / (math.sqrt(2 / 3) + 1e-9)) and not gate.open


def test_window_inclusive_patience_counts_consecutive_violations():
    gate = ZScoreGate("window_inclusive", tau=1.0, window=3, patience=2)
    for h, still_open in ((1.0, True), (2.0, True), (3.0, True), (1.0, True), (2.0, True), (3.0, True), (4.0, False)):
        gate.observe(h)
        assert gate.open == still_open
    # z after 3.0: 1.22 (streak 1); after 1.0: [2, 3, 1] -> -1.22 (reset); 2.0: 0; 3.0: [1, 2, 3] 1.22 (1);
    # 4.0: [2, 3, 4] 1.22 (2): trips


def test_sfpo_official_gate_waits_for_its_window_where_the_ema_trips_at_once():
    entropies = [4.5 - 0.01 * i for i in range(34)] + [5.5]  # slowly falling entropy, then a jump
    official = ZScoreGate("window_inclusive", tau=1.0, window=30)
    ema = ZScoreGate("ema", tau=1.0)
    ema.observe(entropies[0])
    assert not ema.open  # (4.5 - 1) / 1 >= 1 at step 1
    for step, h in enumerate(entropies, 1):
        official.observe(h)
        assert official.open == (step < 35), step


@pytest.mark.parametrize("kind", ["window", "window_inclusive"])
def test_window_warmup_observations_are_dropped(kind):
    gate = ZScoreGate(kind, tau=1.0, window=2, warmup=3)
    for h in (100.0, -50.0, 7.0):
        assert gate.observe(h) == 0.0 and gate.open
    assert len(gate.history) == 0
    plain = ZScoreGate(kind, tau=1.0, window=2)
    for h in (1.0, 1.5, 1.2, 3.0):
        assert gate.observe(h) == plain.observe(h)
        assert gate.open == plain.open


def test_temporary_fallback_reopens():
    gate = ZScoreGate("ema", tau=0.5, fallback="temporary", fallback_window=3)
    gate.observe(5.0)
    assert not gate.open
    for _ in range(2):
        gate.tick_closed()
        assert not gate.open
    gate.tick_closed()
    assert gate.open


def test_permanent_fallback_stays_closed():
    gate = ZScoreGate("ema", tau=0.5)
    gate.observe(5.0)
    for _ in range(100):
        gate.tick_closed()
    assert not gate.open


def test_never_never_trips():
    gate = ZScoreGate("never")
    for h in (1.0, 1e9, float("nan"), 0.0):
        gate.observe(h)
    assert gate.open


@pytest.mark.parametrize("kind", ["ema", "ema_onesided", "window", "window_inclusive"])
def test_state_dict_round_trip(kind):
    kwargs = {"tau": 1.0, "window": 3, "patience": 2, "warmup": 1}
    gate = ZScoreGate(kind, **kwargs)
    for h in (1.0, 1.5, 1.2, 1.3, 9.0):  # the last opens a streak (frozen baseline for window)
        gate.observe(h)
    other = ZScoreGate(kind, **kwargs)
    other.load_state_dict(gate.state_dict())
    for h in (8.0, 1.0):
        assert other.observe(h) == gate.observe(h) and other.open == gate.open


@pytest.mark.parametrize("kwargs,message", [
    ({"kind": "sometimes"}, "gate must be one of"), ({"tau": 0}, "tau must be > 0"), ({"omega": 0}, "omega must be"),
    ({"window": 0}, "window must be"), ({"fallback": "maybe"}, "fallback must be one of"),
    ({"patience": 1.5}, "patience must be"), ({"warmup": -1}, "warmup must be"),
])
def test_bad_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ZScoreGate(**kwargs)
