"""The z-score gate that closes GXPO's (or SFPO's) extrapolation and falls back to one-pass GRPO."""

import math
from collections import deque

GATES = ("ema", "window", "never")
FALLBACKS = ("permanent", "temporary")


class ZScoreGate:
    """observe(H) once per active step; `open` says whether the next step may extrapolate.

    ema: Z = (H - mu) / (sigma + 1e-8), then sigma^2 <- (1-w) sigma^2 + w (H - mu)^2 (sigma >= 0.01),
         mu <- (1-w) mu + w H, from mu = sigma = 1; trips when |Z| >= tau.
    window: Z of H against the previous `window` observations (population std; needs 2), one-sided
         Z >= tau, for `patience` consecutive steps.
    never: never trips.
    permanent fallback: closed for good; temporary: closed for `fallback_window` steps, then reopens.
    """

    def __init__(self, kind="ema", tau=0.5, omega=0.1, window=30, patience=1, fallback="permanent",
                 fallback_window=10):
        if kind not in GATES:
            raise ValueError(f"unknown gate {kind!r}; choose one of {GATES}")
        if fallback not in FALLBACKS:
            raise ValueError(f"unknown fallback {fallback!r}; choose one of {FALLBACKS}")
        if not tau > 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        if not 0 < omega <= 1:
            raise ValueError(f"omega must be in (0, 1], got {omega}")
        for name, value in (("window", window), ("patience", patience), ("fallback_window", fallback_window)):
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        self.kind, self.tau, self.omega, self.fallback = kind, tau, omega, fallback
        self.window, self.patience, self.fallback_window = window, patience, fallback_window
        self.mu, self.sigma = 1.0, 1.0
        self.history = deque(maxlen=window)
        self.streak = 0
        self.closed_for = 0  # steps left closed (temporary); -1: closed for good
        self.trips = 0

    @property
    def open(self) -> bool:
        return self.closed_for == 0

    def tick_closed(self):
        """Call once per step taken while closed."""
        if self.closed_for > 0:
            self.closed_for -= 1

    def observe(self, h: float) -> float:
        """Update with this step's statistic; returns Z (and closes the gate when it trips)."""
        if self.kind == "never":
            return 0.0
        if self.kind == "ema":
            z = (h - self.mu) / (self.sigma + 1e-8)
            var = (1 - self.omega) * self.sigma**2 + self.omega * (h - self.mu) ** 2
            self.sigma = max(math.sqrt(var), 0.01)
            self.mu = (1 - self.omega) * self.mu + self.omega * h
            tripped = abs(z) >= self.tau or not math.isfinite(z)
        else:
            z = 0.0
            if len(self.history) >= 2:
                mean = sum(self.history) / len(self.history)
                std = math.sqrt(sum((x - mean) ** 2 for x in self.history) / len(self.history))
                z = (h - mean) / (std + 1e-8)
            self.history.append(h)
            self.streak = self.streak + 1 if (z >= self.tau or not math.isfinite(z)) else 0
            tripped = self.streak >= self.patience
        if tripped:
            self.trips += 1
            self.streak = 0
            self.closed_for = -1 if self.fallback == "permanent" else self.fallback_window
        return z

    def state_dict(self):
        return {"mu": self.mu, "sigma": self.sigma, "history": list(self.history), "streak": self.streak,
                "closed_for": self.closed_for, "trips": self.trips}

    def load_state_dict(self, state):
        self.mu, self.sigma = state["mu"], state["sigma"]
        self.history = deque(state["history"], maxlen=self.window)
        self.streak, self.closed_for, self.trips = state["streak"], state["closed_for"], state["trips"]
