"""Nightly history from the published manifests: `metamerge history` and the flow's keyed artifacts."""

import json

from typer.testing import CliRunner

from metamerge.engine.coefficients import solve_constant
from metamerge.io.publish import publish_run
from metamerge.pipeline.history import artifact_key, history, trend_lines
from metamerge_prefect.cli import app


def _publish(tmp_path, run_id: str, average: float, lam: float) -> None:
    coefficients = solve_constant(["a", "b"], lam, "task_arithmetic")
    (tmp_path / "src").mkdir(exist_ok=True)
    path = tmp_path / "src" / f"{run_id}-coefficients.json"
    path.write_text(coefficients.to_json())
    model = tmp_path / "src" / f"{run_id}-model.safetensors"
    model.write_bytes(run_id.encode())
    publish_run({"coefficients.json": path, "model.safetensors": model}, str(tmp_path / "pub"), "m", run_id,
                extra={"method": "task_arithmetic", "normalized_average": average, "merged_fingerprint": run_id * 3})


def test_history_lists_committed_nights_in_order_and_skips_an_interrupted_one(tmp_path):
    _publish(tmp_path, "20261125-aaa", 0.50, 0.3)
    _publish(tmp_path, "20261126-bbb", 0.25, 0.4)
    (tmp_path / "pub" / "m" / "20261127-ccc").mkdir()  # a publish killed before its manifest: not a night
    (tmp_path / "pub" / "m" / "20261127-ccc" / "model.safetensors").write_bytes(b"half")
    rows = history(str(tmp_path / "pub"), "m")
    assert [r["run_id"] for r in rows] == ["20261125-aaa", "20261126-bbb"]
    assert [r["normalized_average"] for r in rows] == [0.5, 0.25]
    assert rows[1]["lambda"] == {"a": 0.4, "b": 0.4} and rows[0]["method"] == "task_arithmetic"
    bars = trend_lines(rows)
    assert bars[0].count("█") == 30 and bars[1].count("█") == 15  # scaled to the best night
    assert history(str(tmp_path / "pub"), "other") == []

    shown = CliRunner().invoke(app, ["history", "m", "--target", str(tmp_path / "pub")])
    assert shown.exit_code == 0, shown.output
    lines = shown.output.splitlines()
    assert lines[0].startswith("20261125-aaa") and "avg_norm 0.500" in lines[0] and "λ a 0.300, b 0.300" in lines[0]
    assert "20261127-ccc" not in shown.output and "normalized average per night:" in shown.output


def test_history_reads_an_s3_target(s3_endpoint, bucket, tmp_path):
    files = {"coefficients.json": tmp_path / "c.json"}
    files["coefficients.json"].write_text(solve_constant(["a"], 1.0, "average").to_json())
    for run_id in ("20261124-x", "20261125-y"):
        publish_run(files, f"s3://{bucket}/merges", "zoo", run_id, endpoint_url=s3_endpoint,
                    extra={"method": "average", "normalized_average": 0.3})
    rows = history(f"s3://{bucket}/merges", "zoo", s3_endpoint)
    assert [r["run_id"] for r in rows] == ["20261124-x", "20261125-y"]
    assert rows[0]["manifest"] == f"s3://{bucket}/merges/zoo/20261124-x/manifest.json"
    assert json.loads(json.dumps(rows))  # plain values: a Prefect table artifact takes them as they are


def test_artifact_keys_are_what_prefect_accepts():
    assert artifact_key("Zoo_MetaGPT.v2") == "nightly-history-zoo-metagpt-v2"
