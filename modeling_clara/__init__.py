"""CLaRa as a Hugging Face model: `ClaraConfig`, `ClaraForRAG`, and the tools around them."""

from transformers import AutoConfig, AutoModel

from .configuration_clara import ClaraConfig, ClaraLossConfig
from .modeling_clara import ClaraForRAG, ClaraOutput, ClaraPreTrainedModel, differentiable_topk
from .processing_clara import ClaraProcessor


def __getattr__(name):
    # ClaraIndex needs `datasets` and `accelerate`; import it on first use so the model alone stays light.
    if name in ("ClaraIndex", "SearchResult"):
        from . import index

        return getattr(index, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

# With the package imported, AutoModel loads CLaRa folders (ours and Apple's) without remote code.
AutoConfig.register(ClaraConfig.model_type, ClaraConfig, exist_ok=True)
AutoModel.register(ClaraConfig, ClaraForRAG, exist_ok=True)

__all__ = ["ClaraConfig", "ClaraLossConfig", "ClaraIndex", "SearchResult", "ClaraForRAG", "ClaraOutput", "ClaraPreTrainedModel", "ClaraProcessor", "differentiable_topk"]
