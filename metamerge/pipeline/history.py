"""Nightly history: every committed publish of one model, oldest first, read from its manifests.

The manifests are the record of what was published (a run without one was never committed),
so the history needs neither the Prefect database nor the UI: `metamerge history` prints it
anywhere the target is readable, and the flow turns the same rows into a keyed table artifact.
"""

from __future__ import annotations

import re
from pathlib import Path

from metamerge.engine.coefficients import Coefficients
from metamerge.errors import NotPublishedError
from metamerge.io.manifests import MANIFEST, read_manifest, read_text
from metamerge.io.s3 import S3_FAILURES, s3_client, s3_error
from metamerge.io.targets import parse_target

TREND_WIDTH = 30


def run_uris(target_uri: str, model_name: str, endpoint_url: str | None = None) -> list[str]:
    """Every run folder of `model_name` under the target, in run-id order (ids start with the UTC date)."""
    target = parse_target(target_uri)
    if not target.is_s3:
        model_dir = Path(target.path) / model_name
        return [str(p) for p in sorted(model_dir.iterdir()) if p.is_dir()] if model_dir.is_dir() else []
    client = s3_client(endpoint_url)
    prefix = target.join(model_name) + "/"
    try:
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=target.bucket, Prefix=prefix, Delimiter="/")
        runs = [p["Prefix"].rstrip("/") for page in pages for p in page.get("CommonPrefixes", [])]
    except S3_FAILURES as exc:
        raise s3_error(client, f"listing of s3://{target.bucket}/{prefix}", exc, target.bucket) from exc
    return [f"s3://{target.bucket}/{key}" for key in sorted(runs)]


def history(target_uri: str, model_name: str, endpoint_url: str | None = None) -> list[dict]:
    """One row per committed night: run id, when, method, normalized average, λ, the merged model."""
    rows = []
    for uri in run_uris(target_uri, model_name, endpoint_url):
        try:
            manifest = read_manifest(uri, endpoint_url)
        except NotPublishedError:
            continue  # an interrupted publish: never committed, not part of the history
        lam = {}
        if "coefficients.json" in manifest["files"]:
            lam = Coefficients.from_json(read_text(f"{uri}/coefficients.json", endpoint_url)).model_level()
        rows.append({"run_id": manifest["run_id"], "created": manifest["created"], "method": manifest.get("method"),
                     "normalized_average": manifest.get("normalized_average"),
                     "lambda": {k: round(v, 4) for k, v in lam.items()},
                     "merged": (manifest.get("merged_fingerprint") or "")[:12], "manifest": f"{uri}/{MANIFEST}"})
    return rows


def trend_lines(rows: list[dict]) -> list[str]:
    """The normalized average per night as a text bar chart (the UI renders markdown, not images)."""
    values = [r["normalized_average"] for r in rows if r["normalized_average"] is not None]
    top = max(values, default=0.0) or 1.0
    return [f"{r['run_id']}  {'█' * round(TREND_WIDTH * (r['normalized_average'] or 0.0) / top):<{TREND_WIDTH}}  "
            + (f"{r['normalized_average']:.4f}" if r["normalized_average"] is not None else "-") for r in rows]


def artifact_key(model_name: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return "nightly-history-" + re.sub(r"[^a-z0-9-]+", "-", model_name.lower()).strip("-")
