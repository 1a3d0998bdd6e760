"""Hugging Face folders: ``config.json``, one or sharded ``*.safetensors``, tokenizer and chat template."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from edgellm.config import ModelConfig
from edgellm.loader.errors import ModelLoadError

logger = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# checkpoints saved from the bare model (LlamaModel) lack the "model." prefix
_BARE_PREFIXES = ("embed_tokens.", "layers.", "norm.")


def hf_config(folder: Path) -> ModelConfig:
    """Read ``folder/config.json`` through transformers' AutoConfig into a ModelConfig."""
    from transformers import AutoConfig

    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise ModelLoadError(f"{cfg_file}: missing (not a Hugging Face model folder?)")
    try:
        hf = AutoConfig.from_pretrained(str(folder))
    except Exception as e:
        raise ModelLoadError(f"{cfg_file}: cannot read config: {e}") from e
    try:
        return ModelConfig.from_hf(hf)
    except (ValueError, AttributeError, TypeError) as e:
        raise ModelLoadError(f"{cfg_file}: {e}") from e


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files holding the weights: the index's shards, else ``model.safetensors``."""
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise ModelLoadError(f"{index}: corrupt safetensors index: {e}") from None
        files = [folder / name for name in dict.fromkeys(weight_map.values())]
    elif (folder / SINGLE_FILE).is_file():
        files = [folder / SINGLE_FILE]
    else:
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise ModelLoadError(f"{folder}: no {SINGLE_FILE}, {INDEX_FILE} or *.safetensors files")
    for f in files:
        if not f.is_file():
            raise ModelLoadError(f"{f}: missing safetensors shard (listed in {index.name})")
    return files


def read_safetensors(files: list[Path]) -> dict[str, torch.Tensor]:
    """Every tensor of ``files`` on CPU in its stored dtype, with HF Llama names."""
    from safetensors import safe_open

    weights: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt", device="cpu") as st:
                for key in st.keys():  # noqa: SIM118 - safe_open is not a mapping
                    weights[_normalize(key)] = st.get_tensor(key)
        except ModelLoadError:
            raise
        except Exception as e:  # noqa: BLE001 - SafetensorError, OSError...: name the file
            raise ModelLoadError(f"{f}: cannot read safetensors file: {e}") from None
    return {k: v for k, v in weights.items() if not k.endswith("rotary_emb.inv_freq")}


def _normalize(key: str) -> str:
    return "model." + key if key.startswith(_BARE_PREFIXES) else key


def hf_tokenizer(folder: Path) -> Any:
    """The folder's tokenizer (chat template included when it ships one)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:
        raise ModelLoadError(f"{folder}: cannot load tokenizer: {e}") from e


def load_hf(folder: str) -> tuple[ModelConfig, dict[str, torch.Tensor], list[Path]]:
    """Config, weights (tied lm_head dropped) and weight files of the HF folder ``folder``."""
    root = Path(folder)
    config = hf_config(root)
    files = weight_files(root)
    weights = read_safetensors(files)
    if config.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    return config, weights, files
