from .gate import ZScoreGate
from .grpo import GRPO
from .gxpo import GXPO
from .sfpo import SFPO

__all__ = ["GRPO", "GXPO", "SFPO", "ZScoreGate"]
