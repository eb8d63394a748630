"""`imagine bench` runs each mode end to end and prints its table (timings are not asserted)."""

from __future__ import annotations

import re

import pytest

from imagine.cli import main
from tests.processes import program


@pytest.fixture
def bench_environment(monkeypatch, tmp_path, demo_folder):
    monkeypatch.setenv("IMAGINE_SERVER_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("IMAGINE_SERVER_CACHE_DIR", str(demo_folder.parent))
    monkeypatch.chdir(tmp_path)  # no imagine.toml here: the demo models serve


def table_rows(output: str, title: str) -> list[list[str]]:
    """The rows under a table's title and its dashed rule, split on runs of two spaces."""
    lines = output[output.index(title):].splitlines()
    rule = next(index for index, line in enumerate(lines) if line.startswith("---"))
    rows = []
    for line in lines[rule + 1:]:
        if not line.strip():
            break
        rows.append(re.split(r"\s{2,}", line.strip()))
    return rows


def test_overhead_compares_the_bare_call_with_the_service(bench_environment, capsys) -> None:
    assert main(["bench", "--mode", "overhead", "--model", "sdxl-turbo", "--size", "64", "--steps", "1", "--requests", "3"]) == 0
    output = capsys.readouterr().out
    bare, floor, served = table_rows(output, "overhead:")
    assert bare[0] == "bare pipe()" and bare[3] == "1.000"
    for row in floor, served:
        assert float(row[3]) > 0
        assert row[4].endswith(" ms") and float(row[5]) > 0  # the paired extra and its ratio
        own = float(row[6].removesuffix(" ms"))  # latency minus the request's own pipeline call
        assert 0 < own < float(row[1].removesuffix(" ms")) and float(row[7]) > 1
    assert floor[0] == "aiohttp floor (PNG)" and served[0] == "service (HTTP)"
    # What the service adds over a bare aiohttp route answering the same PNG.
    above = float(served[8].removesuffix(" ms"))
    assert above == pytest.approx(float(served[6].removesuffix(" ms")) - float(floor[6].removesuffix(" ms")), abs=0.1)
    parts = {row[0] for row in table_rows(output, "where a request's time goes")}
    assert parts == {"validate", "queue", "device", "encode", "store"}


def test_overhead_of_stored_json_responses_times_serialising_and_storing(bench_environment, capsys) -> None:
    arguments = ["bench", "--mode", "overhead", "--model", "sdxl-turbo", "--size", "64", "--steps", "1", "--requests", "2"]
    assert main([*arguments, "--response", "json", "--store"]) == 0
    output = capsys.readouterr().out
    assert "JSON responses, stored" in output
    parts = {row[0]: float(row[1]) for row in table_rows(output, "where a request's time goes")}
    assert set(parts) == {"validate", "queue", "device", "encode", "store", "serialize"}
    assert parts["store"] > 0 and parts["serialize"] > 0


def test_batching_pairs_the_service_with_the_best_bare_loop_of_each_round(bench_environment, capsys) -> None:
    arguments = ["bench", "--mode", "batching", "--model", "sdxl-turbo", "--size", "64", "--steps", "1"]
    assert main([*arguments, "--concurrency", "2", "--requests", "4", "--rounds", "2", "--max-wait-ms", "10"]) == 0
    rows = table_rows(capsys.readouterr().out, "batching:")
    assert [row[0] for row in rows] == [
        "bare loop, batch 1",
        "bare loop, batch 2",
        "service, learnt batch sizes (max 2, wait 10 ms)",
    ]
    assert all(float(row[1]) > 0 for row in rows)
    single, pair, service = rows
    assert max(float(single[2]), float(pair[2])) == 1.0  # the best bare loop is the yardstick
    assert int(single[3]) + int(pair[3]) == 2  # each round has one winner
    # The service's row leaves "rounds won" empty: the split on runs of spaces skips it.
    assert service[3] in ("1", "2")  # the size the service settled on
    assert 1.0 <= float(service[4]) <= 2.0
    assert 0 < float(service[5]) < 1  # the device's busy share of the wall time
    assert float(service[6]) > 0  # its pipeline time per image against the bare loop's at its size
    ratios = [float(ratio) for ratio in service[8].split()]
    assert len(ratios) == 2 and all(ratio > 0 for ratio in ratios)


def test_load_counts_statuses_and_refusals_carry_retry_after(bench_environment, capsys) -> None:
    arguments = ["bench", "--mode", "load", "--model", "sdxl-turbo", "--size", "64", "--steps", "1"]
    assert main([*arguments, "--concurrency", "6", "--duration", "1.5", "--queue-size", "2"]) == 0
    [row] = table_rows(capsys.readouterr().out, "load:")
    statuses = dict(part.split(": ") for part in row[4].split(", "))
    assert set(statuses) <= {"200", "503"} and int(statuses["200"]) > 0
    assert row[5] == "0"  # every 503 said when to come back


def test_cluster_compares_the_queues_and_scales_over_replica_processes(bench_environment, capsys) -> None:
    program("redis-server", "/usr/bin/redis-server")
    arguments = ["bench", "--mode", "cluster", "--model", "sdxl-turbo", "--size", "64", "--steps", "1"]
    assert main([*arguments, "--requests", "3", "--concurrency", "2"]) == 0
    output = capsys.readouterr().out
    memory, redis = table_rows(output, "cluster latency:")
    # The memory row leaves "paired extra" empty; the split on runs of spaces drops that cell.
    assert memory[0] == "memory queue" and memory[3] == "0.00 ms" and memory[4] == "1.000" and len(memory) == 7
    assert redis[0] == "redis queue" and float(redis[4]) > 0 and len(redis) == 8
    for row in (memory, redis):
        p50, p90, own = (float(cell.removesuffix(" ms")) for cell in (row[1], row[2], row[-2]))
        assert 0 < own < p50 <= p90
    p50, extra, paired = (float(cell.removesuffix(" ms")) for cell in (redis[1], redis[3], redis[5]))
    assert abs(extra) < p50 and abs(paired) < p50
    single, spread, to_first = table_rows(output, "cluster throughput:")
    assert [row[0] for row in (single, spread, to_first)] == [
        "1 replica",
        "2 replicas, clients spread over both",
        "2 replicas, all 2 clients to the first",
    ]
    # The single replica leaves "made by the second replica" empty.
    assert float(single[1]) > 0 and single[2] == "1.00" and float(single[3]) > 0
    for row in (spread, to_first):
        assert float(row[1]) > 0 and float(row[2]) > 0
        assert re.fullmatch(r"\d+%", row[3]) and 0 <= int(row[3][:-1]) <= 100  # the second replica's share
        assert float(row[4]) > 0  # cores' worth of CPU the two replicas got


def test_switches_adds_one_switch_a_row_and_shows_a_refused_one_with_its_reason(bench_environment, capsys) -> None:
    arguments = ["bench", "--mode", "switches", "--model", "sdxl-turbo", "--size", "64", "--steps", "1", "--requests", "1"]
    assert main([*arguments, "--switches", "eager,sdpa,tf32,channels_last"]) == 0
    eager, sdpa, tf32, channels_last = table_rows(capsys.readouterr().out, "switches:")
    # Cells left empty (compile time and peak memory, on a CPU) drop out of the split: read from the end.
    assert eager[:2] == ["eager attention", "cpu, float32"] and eager[-3:] == ["1.00x", "0", "0.00"]
    assert tf32[0] == "+ tf32" and "models.tf32 needs a CUDA device" in tf32[1]
    # The refused switch is left out of the rows after it.
    assert sdpa[0] == "sdpa attention" and channels_last[0] == "sdpa attention, channels_last"
    for row in sdpa, channels_last:
        assert float(row[-4]) > 0 and row[-3].endswith("x")  # images/s, and the speed-up over the first row
        # Another kernel or memory layout, the same arithmetic: the same image, a level here and there.
        assert int(row[-2]) <= 2 and float(row[-1]) < 0.1


def test_an_unknown_switch_is_refused_before_any_load(bench_environment, capsys) -> None:
    arguments = ["bench", "--mode", "switches", "--model", "sdxl-turbo", "--size", "64", "--steps", "1"]
    assert main([*arguments, "--switches", "sdpa,warp-drive"]) == 2
    assert "unknown switches warp-drive" in capsys.readouterr().err


def test_a_model_named_by_its_alias_is_benched_under_its_own_name(bench_environment, capsys) -> None:
    arguments = ["bench", "--mode", "batching", "--model", "stable-diffusion-xl", "--size", "64", "--steps", "1"]
    assert main([*arguments, "--concurrency", "2", "--requests", "2", "--rounds", "1"]) == 0
    output = capsys.readouterr().out
    assert "batching: sdxl 64x64" in output
    service = table_rows(output, "batching:")[-1]
    assert float(service[5]) > 0  # the device's busy share, read from metrics labelled "sdxl"


def test_an_unknown_model_is_refused_with_a_message(bench_environment, capsys) -> None:
    assert main(["bench", "--mode", "overhead", "--model", "no-such-model"]) == 2
    assert "no-such-model" in capsys.readouterr().err
