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


def test_window_statistics_and_patience():
    gate = ZScoreGate("window", tau=1.0, window=3, patience=2)
    assert gate.observe(1.0) == 0.0 and gate.observe(2.0) == 0.0  # fewer than 2 previous observations
    z = gate.observe(3.0)  # previous [1, 2]: mean 1.5, population std 0.5
    assert z == pytest.approx(3.0) and gate.open  # one step over tau: patience 2 not reached
    z = gate.observe(4.0)  # previous [1, 2, 3]: mean 2, std sqrt(2/3)
    assert z == pytest.approx(2.0 / math.sqrt(2 / 3)) and not gate.open


def test_window_is_one_sided():
    gate = ZScoreGate("window", tau=2.0, window=30)
    for h in (1.0, 2.0, 1.0, 2.0):
        gate.observe(h)
    assert gate.observe(-100.0) < 0 and gate.open


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


def test_state_dict_round_trip():
    gate = ZScoreGate("window", tau=1.0, window=4)
    for h in (1.0, 1.5, 1.2):
        gate.observe(h)
    other = ZScoreGate("window", tau=1.0, window=4)
    other.load_state_dict(gate.state_dict())
    assert other.observe(2.0) == gate.observe(2.0)


@pytest.mark.parametrize("kwargs,message", [
    ({"kind": "sometimes"}, "unknown gate"), ({"tau": 0}, "tau must be > 0"), ({"omega": 0}, "omega must be"),
    ({"window": 0}, "window must be"), ({"fallback": "maybe"}, "unknown fallback"),
    ({"patience": 1.5}, "patience must be"),
])
def test_bad_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ZScoreGate(**kwargs)
