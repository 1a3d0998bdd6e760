"""OpenAI- and Ollama-compatible HTTP server on AsyncLLM."""
