"""lmdiff: audio-driven talking-head video with landmark-guided diffusion.

Importing the package is cheap (numpy only); the heavy libraries load with the modules that need them.
"""

from .errors import LmdiffInputError
from .landmarks import LandmarkSequence

__version__ = "0.1.0"
__all__ = ["LandmarkSequence", "LmdiffInputError", "__version__"]
