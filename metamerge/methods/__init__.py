"""Merge methods: the registry (one entry per method), the plan each becomes, and the kernels.

Importing this package stays cheap (no torch): recipes validate against the registry before
anything heavy loads. The kernels are in `metamerge.methods.kernels`.
"""

from metamerge.methods.plan import MergePlan
from metamerge.methods.registry import METHODS, MethodSpec, compare_defaults, method_spec, plan_for

__all__ = ["METHODS", "MergePlan", "MethodSpec", "compare_defaults", "method_spec", "plan_for"]
