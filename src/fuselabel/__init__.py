"""fuselabel: multi-label classification of image + caption pairs.

from fuselabel import FuseLabel
model = FuseLabel(preset="cpu").fit("train.csv", images="data/")
model.predict(images=["photo.jpg"], captions=["a dog on a sofa"])
"""

from .config import PRESETS, Config, build_config
from .estimator import FuseLabel

__version__ = "0.2.0"
__all__ = ["Config", "FuseLabel", "PRESETS", "build_config", "__version__"]
