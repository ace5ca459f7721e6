"""CLaRa as a Hugging Face model: `ClaraConfig`, `ClaraForRAG`, and the tools around them."""

from transformers import AutoConfig, AutoModel

from .configuration_clara import ClaraConfig
from .modeling_clara import ClaraForRAG, ClaraOutput, ClaraPreTrainedModel, ClaraProcessor, differentiable_topk

# With the package imported, AutoModel loads CLaRa folders (ours and Apple's) without remote code.
AutoConfig.register(ClaraConfig.model_type, ClaraConfig, exist_ok=True)
AutoModel.register(ClaraConfig, ClaraForRAG, exist_ok=True)

__all__ = ["ClaraConfig", "ClaraForRAG", "ClaraOutput", "ClaraPreTrainedModel", "ClaraProcessor", "differentiable_topk"]
