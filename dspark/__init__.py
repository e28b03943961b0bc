"""dspark: DSpark speculative-decoding draft models for HuggingFace transformers."""

from transformers import AutoConfig, AutoModel

from .configuration_dspark import DSparkConfig
from .modeling_dspark import DraftBlock, DSparkDraftModel, extract_target_features
from .speculative import RoundEvent, SpeculativeOutput, speculative_generate

AutoConfig.register("dspark", DSparkConfig, exist_ok=True)
AutoModel.register(DSparkConfig, DSparkDraftModel, exist_ok=True)

__version__ = "0.1.0"

__all__ = [
    "DSparkConfig",
    "DSparkDraftModel",
    "DraftBlock",
    "RoundEvent",
    "SpeculativeOutput",
    "extract_target_features",
    "speculative_generate",
    "__version__",
]
