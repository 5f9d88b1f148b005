"""The benchmark tools' own arithmetic and a CPU run of each (their figures come from the GPU)."""
from __future__ import annotations

import json

from bench.decode_step import decode_step_s
from bench.decode_step import main as decode_step_main


def test_decode_step_is_the_difference_of_medians():
    times = {16: [1.0, 1.2, 5.0], 144: [2.28, 2.5, 2.4]}  # medians 1.2 and 2.4: 128 extra steps
    assert abs(decode_step_s(times, 16, 144) - 1.2 / 128) < 1e-12


def test_decode_step_runs_batchmax_on_a_tiny_model(tiny_llama, tmp_path):
    out = tmp_path / "ds.jsonl"
    rows = decode_step_main(["--model", str(tiny_llama), "--batch", "4", "--prompt-len", "16", "--lens", "2", "6",
                             "--repeats", "1", "--json", str(out)])
    assert [r["system"] for r in rows] == ["batchmax"]
    (line,) = out.read_text().splitlines()
    rec = json.loads(line)
    assert rec["mean_context"] == 20 and len(rec["times"]["2"]) == len(rec["times"]["6"]) == 1
    assert rec["decode_step_ms"] == rows[0]["decode_step_ms"]
