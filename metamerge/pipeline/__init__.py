"""One plain function per pipeline stage, so orchestration stays a thin wrapper (docs/design.md §3).

Each stage takes and returns small values (paths, fingerprints, dicts) and writes its bulky
output under the recipe's workdir at a path named by content (keys.py); the report, the
preflight and the fine-tune registry sit beside the stages.
"""
