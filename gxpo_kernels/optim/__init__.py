"""The update rules. Adding one: a module with the rule (an UpdateRule) and its RuleConfig (optim/config.py),
and one line below."""

from .gate import ZScoreGate
from .grpo import GRPO, GRPORuleConfig
from .gxpo import GXPO, GXPORuleConfig
from .registry import RULES, register, rule_config
from .sfpo import SFPO, SFPORuleConfig

register(GRPORuleConfig)
register(SFPORuleConfig)
register(GXPORuleConfig)

__all__ = ["GRPO", "GXPO", "SFPO", "ZScoreGate", "RULES", "register", "rule_config", "GRPORuleConfig",
           "SFPORuleConfig", "GXPORuleConfig"]
