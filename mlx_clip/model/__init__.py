"""The model: configs (Hugging Face field names), built-in random models, hub resolution, tokenizers and image processing."""
