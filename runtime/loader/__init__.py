"""Weight and tokenizer loading: safetensors folders and GGUF files."""
