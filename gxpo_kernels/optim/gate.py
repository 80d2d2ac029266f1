"""The z-score gate that closes GXPO's (or SFPO's) extrapolation and falls back to one-pass GRPO.

Each kind is one revision of the authors' code, computed as they compute it:

- ema: GXPO's paper-era gate (github SwapniL-afk-now/final-gxpo, commit 1aeea653,
  Code/SFPO/verl/workers/actor/gxpo_state.py). Z = (H - mu) / (sigma + 1e-8), then
  sigma^2 <- (1-w) sigma^2 + w (H - mu)^2 (sigma >= 0.01), mu <- (1-w) mu + w H, from mu = sigma = 1;
  trips when |Z| >= tau. Not scale-free: with H far from 1 it trips within a step or two.
- ema_onesided: the next revision of that file: the same EMA, but the first two observations only
  update it (scored 0), and it trips one-sided, Z >= tau.
- window: the final revision of gxpo_state.py: H scored against the preceding `window` observations
  (H itself not among them), mean and population std, Z = (H - mean) / (std + 1e-9), one-sided,
  scored only once `window` earlier observations exist. With patience > 1 the baseline that scored a
  streak's first violation scores the rest of the streak.
- window_inclusive: SFPO's official gate (github Urheen/SFPO, verl/trainer/ppo/ray_trainer.py), which
  the GXPO authors' final trainer also applies to GXPO's batch entropy: the last `window`
  observations *including* H, Z = (H - mean) / (std + 1e-9), one-sided, evaluated once the window
  is full; patience counts consecutive violations.
- never: never trips.

warmup: the first `warmup` steps cannot be closed by the gate. The EMA kinds keep updating through the
first `warmup` observations and cannot trip on them. The window kinds, with warmup_reset (the authors'
gxpo_reset_entropy_after_warmup, their default), discard them: the history restarts after warm-up, so the
first score comes `window` observations later. Without it the warm-up observations fill the window and
the observation after step `warmup` is the first that can trip (the authors' trainer scores step t - 1's
statistic at step t, once t > warmup).
robust (kind window only): median and max(1.4826 MAD, 0.1 |median|) of the preceding window in place of
mean and std (the authors' gxpo_trigger_robust).
permanent fallback: closed for good; temporary: closed for `fallback_window` steps, then reopens with
its statistics kept. close_for_good() closes it whatever the fallback (the rules' max_active_steps).
"""

import math
from collections import deque

GATES = ("ema", "ema_onesided", "window", "window_inclusive", "never")
FALLBACKS = ("permanent", "temporary")
EMA_EPS, WINDOW_EPS = 1e-8, 1e-9  # the authors' denominators: gxpo_state.py's EMA, np.std(...) + 1e-9
SIGMA_FLOOR = 0.01
EMA_UNSCORED = 2  # ema_onesided scores nothing until two observations exist
MAD_TO_STD, ROBUST_FLOOR = 1.4826, 0.10  # the robust gate's sigma: max(1.4826 MAD, 0.10 |median|)


def int_at_least(value, low) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def gate_checks(gate, tau, omega, window, patience, fallback, fallback_window, warmup, warmup_reset=True,
                robust=False) -> list:
    """(argument, holds, what it must be): the one home of the gate's ranges (its constructor and the rules'
    configs read them)."""
    return [("gate", gate in GATES, f"one of {GATES}"), ("tau", tau > 0, "> 0"),
            ("warmup_reset", isinstance(warmup_reset, bool), "true or false"),
            ("robust", robust is False or (robust is True and gate == "window"),
             "false, or true with gate = 'window' (median / MAD of the preceding window)"),
            ("omega", 0 < omega <= 1, "in (0, 1]"), ("window", int_at_least(window, 1), "an int >= 1"),
            ("warmup", int_at_least(warmup, 0), "an int >= 0"),
            ("patience", int_at_least(patience, 1), "an int >= 1"),
            ("fallback", fallback in FALLBACKS, f"one of {FALLBACKS}"),
            ("fallback_window", int_at_least(fallback_window, 1), "an int >= 1")]


class ZScoreGate:
    """observe(H) once per active step; `open` says whether the next step may extrapolate."""

    def __init__(self, kind="window_inclusive", tau=2.0, omega=0.1, window=30, patience=1,
                 fallback="permanent", fallback_window=10, warmup=0, warmup_reset=True, robust=False):
        given = {"gate": kind, "tau": tau, "omega": omega, "window": window, "patience": patience,
                 "fallback": fallback, "fallback_window": fallback_window, "warmup": warmup,
                 "warmup_reset": warmup_reset, "robust": robust}
        for name, ok, expected in gate_checks(**given):
            if not ok:
                raise ValueError(f"{name} must be {expected}, got {given[name]!r}")
        self.kind, self.tau, self.omega, self.fallback = kind, tau, omega, fallback
        self.window, self.patience, self.fallback_window, self.warmup = window, patience, fallback_window, warmup
        self.warmup_reset, self.robust = warmup_reset, robust
        self.mu, self.sigma = 1.0, 1.0
        self.history = deque(maxlen=window)
        self.frozen = None  # (mean, std) that scored the open streak's first violation (window)
        self.seen = 0  # observations so far, warm-up included
        self.streak = 0
        self.closed_for = 0  # steps left closed (temporary); -1: closed for good
        self.trips = 0

    @property
    def open(self) -> bool:
        return self.closed_for == 0

    def close_for_good(self):
        self.closed_for = -1
        self.streak, self.frozen = 0, None

    def tick_closed(self):
        """Call once per step taken while closed."""
        if self.closed_for > 0:
            self.closed_for -= 1

    def observe(self, h: float) -> float:
        """Update with this step's statistic; returns Z (and closes the gate when it trips)."""
        if self.kind == "never":
            return 0.0
        self.seen += 1
        warming = self.seen <= self.warmup
        if self.kind in ("ema", "ema_onesided"):
            scored = self.kind == "ema" or self.seen > EMA_UNSCORED
            z = self._ema(h)
            if not scored:
                return 0.0
            violation = (abs(z) if self.kind == "ema" else z) >= self.tau or not math.isfinite(z)
        elif warming and self.warmup_reset:  # the history restarts after warm-up
            return 0.0
        else:
            warming = self.seen < self.warmup
            z, scored = self._window_inclusive(h) if self.kind == "window_inclusive" else self._window(h)
            if not scored:
                return 0.0
            violation = z >= self.tau or not math.isfinite(z)
        if warming:
            self.streak, self.frozen = 0, None
            return z
        self.streak = self.streak + 1 if violation else 0
        if not violation:
            self.frozen = None
        if self.streak >= self.patience:
            self.trips += 1
            self.streak, self.frozen = 0, None
            self.closed_for = -1 if self.fallback == "permanent" else self.fallback_window
        return z

    def _ema(self, h):
        z = (h - self.mu) / (self.sigma + EMA_EPS)
        var = (1 - self.omega) * self.sigma**2 + self.omega * (h - self.mu) ** 2
        self.sigma = max(math.sqrt(var), SIGMA_FLOOR)
        self.mu = (1 - self.omega) * self.mu + self.omega * h
        return z

    def _window(self, h):
        """(Z, scored) of h against the preceding full window; h joins the window afterwards."""
        full = len(self.history) == self.window
        if full:
            if self.frozen is None:
                self.mu, self.sigma = (_median_mad(self.history) if self.robust else _mean_std(self.history))
            else:
                self.mu, self.sigma = self.frozen
        self.history.append(h)
        if not full:
            return 0.0, False
        z = (h - self.mu) / (self.sigma + WINDOW_EPS)
        if self.frozen is None and (z >= self.tau or not math.isfinite(z)):
            self.frozen = (self.mu, self.sigma)
        return z, True

    def _window_inclusive(self, h):
        """(Z, scored) of h against the last `window` observations, h among them."""
        self.history.append(h)
        if len(self.history) < self.window:
            return 0.0, False
        self.mu, self.sigma = _mean_std(self.history)
        return (h - self.mu) / (self.sigma + WINDOW_EPS), True

    def state_dict(self):
        return {"mu": self.mu, "sigma": self.sigma, "history": list(self.history), "streak": self.streak,
                "closed_for": self.closed_for, "trips": self.trips, "seen": self.seen,
                "frozen": None if self.frozen is None else list(self.frozen)}

    def load_state_dict(self, state):
        self.mu, self.sigma = state["mu"], state["sigma"]
        self.history = deque(state["history"], maxlen=self.window)
        self.streak, self.closed_for, self.trips = state["streak"], state["closed_for"], state["trips"]
        self.seen = state.get("seen", len(self.history))
        self.frozen = None if state.get("frozen") is None else tuple(state["frozen"])


def _median_mad(values):
    """The robust centre and scale: median and max(1.4826 MAD, 0.10 |median|) (the median of an even count is
    the mean of the middle two, as statistics.median)."""
    import statistics

    median = statistics.median(values)
    mad = statistics.median(abs(x - median) for x in values)
    return median, max(MAD_TO_STD * mad, ROBUST_FLOOR * abs(median))


def _mean_std(values):
    """Mean and population std (np.mean, np.std)."""
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((x - mean) ** 2 for x in values) / len(values))
