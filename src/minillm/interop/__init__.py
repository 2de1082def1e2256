"""Files of other tools, both ways: hf.py converts to and from Hugging Face `transformers`
(GPT-2 and LLaMA architectures, exact weights)."""
