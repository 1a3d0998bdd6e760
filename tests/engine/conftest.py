import pytest

from edgellm import LLM


@pytest.fixture(scope="session")
def fp32_llm(smollm2_gguf):
    """The default model with every tensor dequantized: the reference arithmetic."""
    return LLM(str(smollm2_gguf), weights="dequantize", dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def q4_llm(smollm2_gguf):
    """The default model as users run it: Q4_1 weights kept packed."""
    return LLM(str(smollm2_gguf), device="cpu")


@pytest.fixture(scope="session")
def q4_invariant_llm(smollm2_gguf):
    """The packed model in batch-invariant mode: the same tokens alone, batched, chunked or cached."""
    return LLM(str(smollm2_gguf), device="cpu", batch_invariant=True)
