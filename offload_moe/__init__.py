"""offload_moe: run Mixture-of-Experts language models on one consumer GPU, or on the CPU alone.

    import offload_moe
    model = offload_moe.load()                 # the bundled demo model; or a checkpoint directory
    print(model.generate("To be, or not to be", max_new_tokens=40).text)
"""

from .api.model import Generation, Model
from .checkpoints.config import ModelConfig
from .base.errors import OffloadMoeError
from .api.loader import load
from .generation.options import GenerationOptions
from .placement.options import Placement

__version__ = "0.6.0"


def quantize(src, dst, **kwargs):
    """Write a quantized copy of checkpoint `src` to the new directory `dst` (see tools/convert.py)."""
    from .tools.convert import quantize as convert

    return convert(src, dst, **kwargs)


__all__ = ["load", "quantize", "Placement", "GenerationOptions", "Model", "Generation", "ModelConfig", "OffloadMoeError", "__version__"]
