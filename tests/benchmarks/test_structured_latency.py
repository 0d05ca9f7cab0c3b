"""`python -m benchmarks.structured_latency --quick`: shrunk models are timed beside the dense ones (issue 20)."""

from helpers import run_quick_study


def test_quick_run_times_dense_and_shrunk_models(tmp_path):
    report, done = run_quick_study("structured_latency", tmp_path / "latency.json", in_process=True)
    rows = {(r["model"], r["variant"]): r for r in report["rows"]}
    assert set(rows) == {
        ("minilm", "dense"),
        ("minilm", "ffn 50 %"),  # BERT's heads cannot shrink: no heads row
        ("llama-quick", "dense"),
        ("llama-quick", "ffn 50 %"),
        ("llama-quick", "ffn 50 % + heads 50 %"),
    }
    assert rows["minilm", "ffn 50 %"]["config"]["intermediate_size"] == 768
    assert rows["minilm", "ffn 50 %"]["parameters"] < rows["minilm", "dense"]["parameters"]
    assert rows["llama-quick", "ffn 50 %"]["config"]["intermediate_size"] == 86
    assert rows["llama-quick", "ffn 50 % + heads 50 %"]["config"]["num_attention_heads"] == 2
    assert all(s > 0 for r in report["rows"] for s in r["seconds"])
    assert "| minilm | ffn 50 % |" in done.stdout
