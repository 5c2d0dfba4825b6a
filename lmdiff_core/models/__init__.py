"""Models: A2L (audio features + reference landmarks -> canonical landmarks) and the L2V denoiser (diffusers-style)."""

from .a2l_diffusion import A2LDiffusion
from .a2l_lstm import A2LLSTM
from .l2v_unet import L2VUNet

__all__ = ["A2LDiffusion", "A2LLSTM", "L2VUNet"]
