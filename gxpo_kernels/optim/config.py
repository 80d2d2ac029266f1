"""An update rule's knobs, declared once: each rule's module defines a RuleConfig dataclass (its fields, its
presets, its checks, the facts a trainer reads off it) whose build() makes the rule, and registers it in
RULES (gxpo_kernels/optim/__init__.py). The rule's constructor, the trainer's [<name>] section and its
--<name>.<field> flags, TRL's rule_kwargs and gxpo-bench all take the rule through this one declaration."""

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch


@dataclass
class RuleConfig:
    """Subclasses set `name` (the registry key and the trainer's section), `rule` (the UpdateRule class they
    build) and, where the rule has named hyperparameter sets, `presets` ({preset: {field: value}}, the fields
    left None taking the chosen preset's value) with `default_preset`, and a `preset` field."""

    name: ClassVar[str] = ""
    rule: ClassVar[type] = None
    presets: ClassVar[dict] = {}
    default_preset: ClassVar[str | None] = None

    def resolved(self) -> "RuleConfig":
        """A copy with the preset's value in every field left None (unchanged where the preset is unknown:
        check() names it)."""
        if not self.presets:
            return dataclasses.replace(self)
        preset = self.default_preset if self.preset is None else self.preset
        values = self.presets.get(preset, {})
        return dataclasses.replace(self, preset=preset,
                                   **{k: v for k, v in values.items() if getattr(self, k) is None})

    def checks(self, cfg=None) -> list:
        """(field, holds, what it must be) for each field of a resolved config; cfg: a trainer's whole config
        (unused by the rules, which stand alone)."""
        if not self.presets:
            return []
        return [("preset", self.preset in self.presets, f"one of {tuple(self.presets)}")]

    def check(self):
        for name, ok, expected in self.checks():
            if not ok:
                raise ValueError(f"{name} must be {expected}, got {getattr(self, name)!r}")

    @property
    def reads_batch_entropy(self) -> bool:
        """The rule observes the corrective pass's token entropy over the whole batch (its closure must
        return it, and no completion may leave the pass)."""
        return False

    def build(self, params, base=torch.optim.AdamW, *, max_grad_norm=None, allow_bf16_params=False, **base_kwargs):
        """The rule on params, driving `base` (a torch.optim.Optimizer class built with base_kwargs, or an
        instance)."""
        return self.rule(params, base, config=self, max_grad_norm=max_grad_norm, allow_bf16_params=allow_bf16_params,
                         **base_kwargs)

    @classmethod
    def split(cls, config, kwargs: dict) -> tuple:
        """(this config resolved and checked, the base optimizer's kwargs): a rule's constructor takes its
        config whole or as keywords mixed with the base optimizer's (GXPO(params, alpha=0.3, lr=1e-6))."""
        fields = {f.name for f in dataclasses.fields(cls)}
        given = {k: v for k, v in kwargs.items() if k in fields}
        if config is not None and given:
            raise ValueError(f"{sorted(given)}: pass them in config or as keywords, not both")
        if config is None:
            config = cls(**given)
        elif not isinstance(config, cls):
            raise ValueError(f"config must be a {cls.__name__}, got {type(config).__name__}")
        config = config.resolved()
        config.check()
        return config, {k: v for k, v in kwargs.items() if k not in fields}
