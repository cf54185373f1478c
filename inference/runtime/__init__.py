"""The runtime: a model version's weights and what runs them. Loading (GGUF, Hugging Face
folders, the demo model), weight-only quantization, the tokenizer and chat template,
the model, the continuous-batching engine on the compute thread, sampling with its
confidence statistics, and the kernels.

Imports nothing from `inference.api` nor `inference.edge`.
"""
