"""``benchmarks/throughput.py --cluster`` without the cluster: argument parsing, the refusal
without root, and the report files written from a synthetic run (the benchmark itself needs
root and the emulated cluster, and is not part of the test suite)."""

from __future__ import annotations

import json

import pytest

from benchmarks import netns, throughput


def test_rates_parse_in_tc_syntax():
    assert throughput.parse_rates("1gbit,10gbit,100gbit") == [1.0, 10.0, 100.0]
    assert throughput.parse_rates("500mbit, 2.5Gbit") == [0.5, 2.5]
    for bad in ("10", "10gb", "0gbit", "fast"):
        with pytest.raises(ValueError, match="bad rate"):
            throughput.parse_rates(bad)


def test_cluster_defaults_and_checks():
    args = throughput.parse_args(["--cluster"])
    assert args.contenders == list(throughput.CLUSTER_CONTENDERS)
    assert args.real_gbits == [1.0, 10.0, 100.0] and args.plain_gbits == []
    assert args.steps == args.min_steps == args.repeats == 3 and args.phase_warmup == 0
    assert args.real_tokens_per_gpu == 65536 and args.out_dir.name == "results"
    args = throughput.parse_args(["--cluster", "--rates", "100gbit", "--repeats", "4", "--quick"])
    assert args.real_gbits == [100.0] and args.steps == 4 and args.out_dir.name == "qg_throughput_quick"
    with pytest.raises(ValueError, match="repeats >= 3"):
        throughput.parse_args(["--cluster", "--repeats", "2"])
    with pytest.raises(ValueError, match="--rates"):
        throughput.parse_args(["--rates", "1gbit"])
    plain = throughput.parse_args([])  # the single-node benchmark is unchanged
    assert plain.phase_warmup is None and plain.steps == 5 and plain.real_gbits == [400.0, 100.0]


def test_cluster_refuses_without_root(monkeypatch, capsys):
    monkeypatch.setattr(throughput.os, "geteuid", lambda: 1000)

    def no_subprocess(*a, **k):
        raise AssertionError("nothing may run before the root check")
    monkeypatch.setattr(throughput.subprocess, "run", no_subprocess)
    monkeypatch.setattr(throughput.subprocess, "Popen", no_subprocess)
    assert throughput.main(["--cluster"]) == 2
    assert "--cluster needs root" in capsys.readouterr().err


def _synthetic_result(args) -> dict:
    """What the ranks publish for an unshaped phase plus the scaled ones (every step 1 MB)."""
    calibration = [{"fwd_bwd_s": 0.5, "flops_per_token": 2.4e7, "flop_s": 4.9e10}] * 2
    scaled, arithmetic = throughput.link_rates(args, calibration)
    phases = [{"name": "unlimited", "rate_bit_s": None, "real_gbit_s": None, "scaled": False}, *scaled]
    for i, phase in enumerate(phases):
        phase["shaping"] = vars(netns.Shaping(rate_bit_s=phase["rate_bit_s"], delay_ms=0.0,
                                              qdisc="tbf" if i else "none", delay_emulated=False))
        phase["loadavg_1m"] = 1.0
    records = []
    for i, _ in enumerate(phases):
        warm = args.warmup if i == 0 else 0
        rank = {name: [{"s": 1.0 + 0.5 * k + 0.01 * step, "wire": 1.05e6, "loss": 5.0, "bytes": 1e6,
                        "calls": 7 if name.startswith("ours") else None, "warmup": step < warm,
                        "refresh": name.startswith("ours") and i == 0 and step == 0}
                       for step in range(warm + args.steps)] for k, name in enumerate(args.contenders)}
        records.append([rank, rank])
    return {"calibration": calibration, "phases": phases, "records": records, "params": 1000,
            "hosts": ["node1", "node2"], "arithmetic": arithmetic, "worker_rc": [0],
            "collective_wire": {"all_reduce": 1.0, "broadcast": 0.5}}


def test_report_files_from_a_synthetic_run(tmp_path):
    args = throughput.parse_args(["--cluster", "--out-dir", str(tmp_path)])
    result = _synthetic_result(args)
    payload = throughput.cluster_payload(args, result, found_up=False, load_before=0.5, wall_s=12.0)
    assert payload["failures"] == []
    json_path, md_path = throughput.write_cluster_outputs(payload, tmp_path)
    assert json_path.name == "throughput_cluster.json" and (tmp_path / "throughput_cluster.png").exists()
    saved = json.loads(json_path.read_text())
    assert saved["environment"]["command"] and saved["loadavg_before"] == 0.5
    row = next(r for r in saved["rows"] if r["phase"] == "scaled 1G" and r["contender"] == "ddp_adamw")
    assert row["n"] == 3 and row["tokens_per_s_std"] > 0
    assert row["tokens_per_s_mean"] == pytest.approx(sum(2048 / s for s in (1.5, 1.51, 1.52)) / 3)
    md = md_path.read_text()
    for text in ("mean ± sample std", "| ours_overlap / ddp_adamw |", "scaled 100G", "T_real = 65536",
                 "load average (1 min) before / after: 0.50", "rank0=node1, rank1=node2", "Validation: passed"):
        assert text in md, text
    result["hosts"] = ["node1", "node1"]
    bad = throughput.cluster_payload(args, result, found_up=False, load_before=0.5, wall_s=12.0)
    assert any("not rank0=node1 rank1=node2" in f for f in bad["failures"])
