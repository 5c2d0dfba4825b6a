"""A2L models: audio features + reference landmarks -> canonical landmark sequences (diffusers-style)."""

from .a2l_diffusion import A2LDiffusion
from .a2l_lstm import A2LLSTM

__all__ = ["A2LDiffusion", "A2LLSTM"]
