"""fuselabel: multi-label classification of image + caption pairs.

    records -> data -> encoders -> heads -> module -> train / predict -> bundle
"""

from .config import PRESETS, Config, build_config

__version__ = "0.1.0"
__all__ = ["Config", "PRESETS", "build_config", "__version__"]
