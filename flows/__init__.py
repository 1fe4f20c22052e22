"""Prefect flows: `merge_flow` is the DAG of DESIGN.md §3."""
