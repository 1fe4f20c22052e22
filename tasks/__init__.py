"""Prefect task wrappers, one per pipeline stage; all logic lives in `metamerge.stages`."""
