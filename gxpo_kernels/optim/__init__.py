from .gate import ZScoreGate
from .gxpo import GXPO
from .sfpo import SFPO

__all__ = ["GXPO", "SFPO", "ZScoreGate"]
