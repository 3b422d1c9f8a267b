"""`gemma-surgery trace`: graph JSON + offline HTML from the embedded model."""

from __future__ import annotations

import json

from gemma_surgery import cli


def test_trace_writes_graph_json_and_html(capsys, tmp_path):
  out = tmp_path / "trace"
  argv = ["trace", "tiny", "--prompt", "a = b; a =", "--out", str(out)]
  assert cli.main([*argv, "--max-logits", "2"]) == 0
  data = json.loads((out / "graph.json").read_text())
  assert set(data) == {"metadata", "qParams", "nodes", "links"}
  kinds = {n["feature_type"] for n in data["nodes"]}
  assert {"embedding", "logit"} <= kinds and data["links"]
  assert data["metadata"]["prompt"] == "a = b; a ="
  page = (out / "graph.html").read_text()
  assert "gsv-graph" in page and "https://" not in page
  assert "wrote" in capsys.readouterr().out


def test_trace_bad_thresholds_exit_2_before_loading(capsys, tmp_path):
  argv = ["trace", "tiny", "--prompt", "x", "--out", str(tmp_path / "t")]
  assert cli.main([*argv, "--node-threshold", "1.5"]) == 2
  err = capsys.readouterr().err
  assert "--node-threshold 1.5 must be in [0, 1]" in err and "loaded" not in err
