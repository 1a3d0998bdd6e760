"""Weight and tokenizer loading: safetensors folders and GGUF files, one entry point.

>>> from edgellm.loader import load_model                                # doctest: +SKIP
>>> m = load_model("SmolLM2-135M-Instruct.Q4_1.gguf")                   # doctest: +SKIP
>>> m.config.num_layers, type(m.weights["model.layers.0.mlp.up_proj.weight"]).__name__  # doctest: +SKIP
(30, 'QuantizedTensor')
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from edgellm.config import ModelConfig
from edgellm.loader.errors import ModelLoadError
from edgellm.quant import QuantizedTensor

logger = logging.getLogger(__name__)

__all__ = ["LoadedModel", "ModelLoadError", "load_model"]


@dataclass
class LoadedModel:
    """A model read from disk: config, CPU weights in Hugging Face Llama naming, tokenizer."""

    config: ModelConfig
    weights: dict[str, torch.Tensor | QuantizedTensor]
    tokenizer: Any  # transformers PreTrainedTokenizerBase, chat template set when the model has one
    path: str
    file_bytes: int  # size of the weight files on disk
    name: str  # for display

    @property
    def weight_bytes(self) -> int:
        """Bytes the weights occupy in memory."""
        return sum(w.nbytes if isinstance(w, QuantizedTensor) else w.numel() * w.element_size()
                   for w in self.weights.values())


def load_model(path: str, dequantize: bool = False) -> LoadedModel:
    """Load a ``.gguf`` file or a Hugging Face safetensors folder.

    GGUF Q8_0/Q4_0/Q4_1 tensors stay ``QuantizedTensor`` unless ``dequantize`` (then every tensor
    is dense float32). HF tensors keep their stored dtype. Raises ModelLoadError naming the file.

    >>> m = load_model("/models/SmolLM2-135M-Instruct")  # doctest: +SKIP
    >>> m.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)  # doctest: +SKIP
    """
    from edgellm.loader.validate import check_weights

    t0 = time.perf_counter()
    p = Path(path)
    if p.is_dir():
        from edgellm.loader.hf import hf_tokenizer, load_hf

        config, weights, files = load_hf(str(p))
        t1 = time.perf_counter()
        tokenizer = hf_tokenizer(p)
        file_bytes = sum(f.stat().st_size for f in files)
        if dequantize:
            weights = {k: v.float() for k, v in weights.items()}
        source = str(p)
    elif p.is_file():
        from edgellm.loader.gguf import load_gguf
        from edgellm.loader.gguf_tokenizer import load_gguf_tokenizer

        config, weights, header = load_gguf(str(p), dequantize)
        t1 = time.perf_counter()
        tokenizer = load_gguf_tokenizer(str(p), header.metadata)
        file_bytes = header.file_size
        source = str(p)
    else:
        raise ModelLoadError(f"{path}: no such file or folder")
    weights = check_weights(config, weights, source)
    t2 = time.perf_counter()
    logger.info("loaded %s: weights %.2f s, tokenizer %.2f s", path, t1 - t0, t2 - t1)
    name = p.name if p.is_dir() else p.stem
    return LoadedModel(config, weights, tokenizer, str(p), file_bytes, name)
