"""Prefect task wrappers, one per pipeline stage; all logic lives in `metamerge.pipeline`.

A task module adds only what Prefect needs: the cache key (caching.py), the retry policy
(policy.py), artifacts for the UI, and the payloads tasks hand each other (payloads.py).
Installed as `metamerge_prefect.tasks`.
"""
