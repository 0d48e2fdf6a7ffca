"""benchmarks/serve_bench.py without running it: its options, its percentiles, ratios and targets,
and its table. The measurement itself is never a timed test; see benchmarks/README.md."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "serve_bench.py"


@pytest.fixture(scope="module")
def sbench():
    spec = importlib.util.spec_from_file_location("paw_lite_serve_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["paw_lite_serve_bench"] = module
    spec.loader.exec_module(module)
    return module


def _level(clients, rps, p50, p99, **more):
    return {"clients": clients, "requests": 64, "wall_s": 64 / rps, "throughput_rps": rps, "p50_s": p50, "p99_s": p99,
            **more}


def _result(sbench):
    levels = {"paw-lite serve": [_level(1, 5.0, 0.2, 0.25, in_process_map_rps=5.5),
                                 _level(4, 12.0, 0.3, 0.4, in_process_map_rps=13.0),
                                 _level(16, 25.0, 0.6, 0.9, in_process_map_rps=27.0)],
              "llama_cpp.server": [_level(1, 3.0, 0.33, 0.4), _level(4, 3.1, 1.3, 1.5), _level(16, 3.2, 5.0, 5.5)]}
    return {"levels": levels, "in_process_p50_s": 0.18, "ratios": sbench.ratios(levels, 0.18),
            "conditions": {"requests": 64, "clients": [1, 4, 16], "output_tokens": 8, "cpus": 2,
                           "loadavg_before": (0.1, 0, 0), "loadavg_after": (0.3, 0, 0), "numpy": "2",
                           "llama_cpp_python": "0.3.36"}}


def test_percentiles_interpolate_between_ranks(sbench):
    values = [0.4, 0.1, 0.3, 0.2]
    assert sbench.percentile(values, 50) == pytest.approx(0.25)
    assert sbench.percentile(values, 99) == pytest.approx(0.397)
    assert sbench.percentile([7.0], 99) == 7.0
    with pytest.raises(ValueError):
        sbench.percentile([], 50)


def test_ratios_and_targets_in_the_table(sbench):
    result = _result(sbench)
    assert result["ratios"] == pytest.approx({"scaling_16_vs_1": 5.0, "vs_llama_16": 25.0 / 3.2,
                                              "lone_p50_vs_in_process": 0.2 / 0.18})
    table = sbench.format_table(result)
    assert "| 16 | 25.00 | 600 ms | 900 ms | 27.00 | 3.20 | 5000 ms | 5500 ms | 7.81x |" in table
    assert "In-process call (paw_lite.function, 8 tokens): p50 180 ms." in table
    assert "target scaling_16_vs_1 (paw-lite serve, 16 clients / 1 client (throughput)): >= 4: met (5.00)" in table
    assert "target vs_llama_16 (paw-lite serve / llama_cpp.server, 16 clients (throughput)): >= 5: met (7.81)" in table
    assert "<= 1.3: met (1.11)" in table
    slow = {**result, "ratios": {"scaling_16_vs_1": 2.0}}
    table = sbench.format_table(slow)
    assert ">= 4: NOT met (2.00)" in table and "target vs_llama_16" in table and "not measured" in table


def test_options_and_output(sbench, tmp_path, capsys):
    seen = {}

    def fake_run(cache, requests, clients, log):
        seen.update(cache=cache, requests=requests, clients=clients)
        return _result(sbench)

    out = tmp_path / "r.json"
    result = sbench.main(["--quick", "--clients", "1,16", "--cache", str(tmp_path), "--output", str(out), "--json"],
                         runner=fake_run)
    assert seen == {"cache": tmp_path, "requests": 16, "clients": (1, 16)}
    assert json.loads(out.read_text()) == json.loads(capsys.readouterr().out) == json.loads(json.dumps(result))
    sbench.main(["--cache", str(tmp_path)], runner=fake_run)
    assert seen["requests"] == 128 and seen["clients"] == (1, 4, 16)
    assert (tmp_path / sbench.OUTPUT_NAME).is_file() and "| clients |" in capsys.readouterr().out
    for bad in (["--clients", "1,x"], ["--clients", "0,4"], ["--requests", "0"]):
        with pytest.raises(SystemExit):
            sbench.main([*bad, "--cache", str(tmp_path)], runner=fake_run)


def test_each_server_gets_the_request_it_understands(sbench):
    template = "[PSEUDO_PROGRAM]\nTask: x\n[END_PSEUDO_PROGRAM]\n\n[INPUT]\n{INPUT_PLACEHOLDER}\n[END_INPUT]"
    ours = sbench.request_body("paw-lite serve", "disk full", template)
    theirs = sbench.request_body("llama_cpp.server", "disk full", template)
    assert ours["prompt"] == "disk full" and theirs["prompt"] == template.replace("{INPUT_PLACEHOLDER}", "disk full")
    assert ours["max_tokens"] == theirs["max_tokens"] == 8 and theirs["temperature"] == 0
