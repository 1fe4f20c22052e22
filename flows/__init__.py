"""Prefect flows (installed as `metamerge_prefect.flows`): `merge_flow` is the DAG of docs/design.md §3."""
