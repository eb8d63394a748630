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
    bare, served = table_rows(output, "overhead:")
    assert bare[0] == "bare pipe()" and bare[3] == "1.000"
    assert served[0] == "service (HTTP)" and float(served[3]) > 0
    assert served[4].endswith(" ms") and float(served[5]) > 0  # the paired extra and its ratio
    own = float(served[6].removesuffix(" ms"))  # latency minus the request's own pipeline call
    assert 0 < own < float(served[1].removesuffix(" ms")) and float(served[7]) > 1
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
    ratios = [float(ratio) for ratio in service[7].split()]
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
