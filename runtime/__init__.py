"""edgellm: LLM inference for the hardware people actually have.

>>> from edgellm import LLM, SamplingParams                      # doctest: +SKIP
>>> llm = LLM("smollm2-135m-instruct")                           # doctest: +SKIP
>>> llm.generate(["The capital of France is"], SamplingParams(max_tokens=8, temperature=0))[0].text
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from edgellm.sampling_params import SamplingParams

__version__ = "0.1.0"

if TYPE_CHECKING:
    from edgellm.async_llm import AsyncLLM
    from edgellm.llm import LLM

__all__ = ["LLM", "AsyncLLM", "SamplingParams", "__version__"]


def __getattr__(name: str):
    # the engine pulls in torch and transformers: import it when first asked for, not on `import edgellm`
    if name == "LLM":
        from edgellm.llm import LLM

        return LLM
    if name == "AsyncLLM":
        from edgellm.async_llm import AsyncLLM

        return AsyncLLM
    raise AttributeError(f"module 'edgellm' has no attribute {name!r}")
