"""ComfyUI entry point of the lmdiff node pack.

ComfyUI imports this file under a module name derived from its path, so imports stay relative. Loading the pack is
cheap: the node modules import torch, MediaPipe and diffusers only when a node first runs.
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
