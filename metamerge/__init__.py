"""metamerge: data-free MetaGPT merging of fine-tuned LLMs, streamed tensor by tensor.

The core package is plain Python + torch; Prefect lives only in `tasks/` and `flows/`.
"""

__version__ = "0.1.0"
