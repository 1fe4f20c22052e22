"""The merge engine: safetensors I/O, compatibility checks, task-vector statistics, coefficient
solvers and the streaming merge (whole or by shard). Paths in, files out; no orchestration."""
