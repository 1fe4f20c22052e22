"""metamerge: data-free MetaGPT merging of fine-tuned LLMs, streamed tensor by tensor.

The core package is plain Python + torch, in subpackages with one job each (docs/design.md §2);
Prefect lives only on the orchestration side, `metamerge_prefect`.
"""

__version__ = "0.2.0"
