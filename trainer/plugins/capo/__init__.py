"""CAPO, the plug-in (plugin.py) and its kernels: our variant's scores (kernels.py) and the authors'
(official_kernels.py)."""

from .plugin import PLUGIN, CAPOConfig

__all__ = ["PLUGIN", "CAPOConfig"]
