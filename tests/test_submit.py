"""jobs/submit.py's publishing of a run's committed outputs. `ray job submit` itself is tested on the node-chaos
cluster (tests/test_node_chaos.py): one cluster for every test that needs one."""

import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _load_submit_script():
    spec = importlib.util.spec_from_file_location("newsclip_jobs_submit", REPO / "jobs" / "submit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_publish_copies_committed_files_manifest_last(tmp_path, monkeypatch):
    submit = _load_submit_script()
    output = tmp_path / "output"
    current = ["metrics.csv", "rankings/demo-tiny.tsv", "embeddings/x/texts/part-0.parquet"]
    for relative in [*current, "config.resolved.yaml", ".lock", "logs/newsclip.log", "rankings/old-fusion.tsv",
                     ".staging/half-written/part-0.parquet", "rankings/.demo-tiny.tsv.1234.tmp"]:
        (output / relative).parent.mkdir(parents=True, exist_ok=True)
        (output / relative).write_text(relative)
    (output / "manifest.json").write_text(json.dumps({"completed": {
        "encode": {"files": [current[2]]}, "knn": {"files": [current[1]]}, "evaluate": {"files": [current[0]]}}}))
    copied = submit.publish(output, f"file://{tmp_path / 'published'}")
    assert copied[-1] == "manifest.json"
    assert sorted(copied) == ["config.resolved.yaml", "embeddings/x/texts/part-0.parquet", "manifest.json",
                              "metrics.csv", "rankings/demo-tiny.tsv"]
    assert (tmp_path / "published" / "rankings" / "demo-tiny.tsv").read_text() == "rankings/demo-tiny.tsv"
    assert not (tmp_path / "published" / ".staging").exists() and not (tmp_path / "published" / ".lock").exists()
    monkeypatch.chdir(tmp_path)
    assert len(submit.publish(output, "plain/relative/path")) == 5  # a plain path works too
    assert (tmp_path / "plain" / "relative" / "path" / "metrics.csv").exists()
