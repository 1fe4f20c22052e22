"""Prefect deployments (nightly schedule, new-fine-tune trigger), installed as `metamerge_prefect.deployments`."""
