"""Prefect deployments (nightly schedule, new-fine-tune trigger): see deployments/README.md."""
