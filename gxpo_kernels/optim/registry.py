"""RULES: every update rule by name, as its RuleConfig class (gxpo_kernels/optim/config.py)."""

import dataclasses

RULES: dict = {}


def register(config_cls: type) -> type:
    if not config_cls.name or config_cls.rule is None:
        raise ValueError(f"{config_cls.__name__} needs a name and a rule to register")
    if config_cls.name in RULES:
        raise ValueError(f"update rule {config_cls.name!r} is registered twice")
    RULES[config_cls.name] = config_cls
    return config_cls


def rule_config(name: str, **fields):
    """The named rule's config with these fields (the rest at their defaults), or a ValueError naming what
    is unknown."""
    if name not in RULES:
        raise ValueError(f"unknown update rule {name!r}; choose one of {tuple(RULES)}")
    config_cls = RULES[name]
    known = [f.name for f in dataclasses.fields(config_cls)]
    if unknown := sorted(set(fields) - set(known)):
        raise ValueError(f"update rule {name!r} has no field {unknown}; its fields: {known}")
    return config_cls(**fields)
