"""Model families written against backend ops only, and the registry that names them."""
from edgellm.models.llama import LlamaForCausalLM

MODEL_REGISTRY = {"llama": LlamaForCausalLM}

__all__ = ["MODEL_REGISTRY", "LlamaForCausalLM"]
