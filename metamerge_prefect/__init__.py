"""The orchestration side: Prefect tasks, flows, deployments and the `metamerge` CLI.

Installed as one namespaced package so that no generic top-level name (`tasks`, `flows`,
`deployments`) lands in site-packages. Its `tasks`, `flows` and `deployments` subpackages
live in the repository's top-level folders of those names (pyproject.toml maps them), where a
reader of the project looks for them. The core package `metamerge` never imports this one.
"""
