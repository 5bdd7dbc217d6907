"""Downloads and `exoctl bench` in one process: progress accounting, EXO's download shape, the
disk-space check, and the benchmark's statistics and per-node split."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import msgpack
import pytest

from exoctl.cluster.downloads import download_doc
from exoctl.cluster.measure import Stat, per_node, percentile, prompt_of
from exoctl.errors import ExoctlError
from exoctl.models.hub_fetch import Download, check_space
from exoctl.wire.download_report import DownloadReport, FileReport
from exoctl.wire.protocol import ProtocolError
from exoctl.wire.runner_report import RunnerReport, RunnerStatus


def test_a_downloads_progress_counts_resumed_bytes_apart_from_this_sessions() -> None:
    download = Download("d1", "owner/model", (0, 2), 4)
    download.plan({"a.json": 100, "b.safetensors": 1000}, {"a.json": 100})
    download.resumed("b.safetensors", 400)  # a partial file found: fetching starts at byte 400
    download.advance("b.safetensors", 200)
    report = download.report()
    assert (report.total, report.downloaded, report.downloaded_this_session) == (1100, 700, 200)
    assert (report.completed_files, report.total_files) == (1, 2)
    assert report.state == "ongoing" and report.speed > 0 and report.eta_ms > 0
    assert report.files["b.safetensors"] == FileReport(
        total=1000, downloaded=600, downloaded_this_session=200
    )
    download.complete(Path("/cache/snapshot"))
    done = download.report()
    assert done.state == "completed" and done.downloaded == 1100 and done.eta_ms == 0 and done.ended
    assert DownloadReport.from_wire(msgpack.unpackb(msgpack.packb(done.to_wire()))) == done


def test_the_state_shows_downloads_in_exos_tagged_shape() -> None:
    download = Download("d2", "owner/model", (2, 4), 4, instance_id="i1")
    download.plan({"x.safetensors": 10}, {})
    download.advance("x.safetensors", 4)
    doc = download_doc("node2", download.report())
    body = doc["DownloadOngoing"]
    assert body["nodeId"] == "node2" and body["instanceId"] == "i1" and body["modelId"] == "owner/model"
    assert body["shardMetadata"]["PipelineShardMetadata"]["startLayer"] == 2 and body["startedAt"] > 0
    assert body["downloadProgress"]["downloaded"] == {"inBytes": 4}
    assert body["downloadProgress"]["files"]["x.safetensors"]["total"] == {"inBytes": 10}
    download.fail("node node2: no space", "free some")
    failed = download_doc("node2", download.report())["DownloadFailed"]
    assert failed["errorMessage"] == "node node2: no space" and failed["hint"] == "free some"
    wire = download.report().to_wire()
    for bad, text in [
        ({**wire, "state": "exploded"}, "download state 'exploded' is not one of pending"),
        ({**wire, "total": "lots"}, "download report field 'total' must be int"),
        ({**wire, "files": {"a": {"total": 1.5}}}, "its bytes must be integers"),
    ]:
        with pytest.raises(ProtocolError, match=text):
            DownloadReport.from_wire(bad)


def test_too_little_disk_is_refused_before_a_byte_is_written(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr("shutil.disk_usage", lambda path: SimpleNamespace(free=3 * 2**30))
    check_space("owner/model", 2 * 2**30)
    with pytest.raises(
        ExoctlError, match=r"not enough disk space for owner/model: 5.00 GiB to download, 3.00 GiB free"
    ):
        check_space("owner/model", 5 * 2**30)


def test_bench_statistics() -> None:
    stat = Stat([10.0, 12.0, 14.0])
    assert stat.mean == 12.0 and stat.sd == 2.0 and Stat([5.0]).sd == 0.0
    assert percentile([1, 2, 3, 4, 5], 50) == 3 and percentile([1, 2, 3, 4, 5], 95) == pytest.approx(4.8)
    assert prompt_of(20, 1) != prompt_of(20, 2) and len(prompt_of(20, 1).split()) == 20


def report(
    node_range: tuple[int, int], sharding: str, decoded: int, compute: float, collective: float
) -> RunnerReport:
    return RunnerReport(
        runner_id="r", instance_id="i", model_id="m", sharding=sharding, dtype="float32",
        start_layer=node_range[0], end_layer=node_range[1], n_layers=4, rank=0, world=2, nodes=("a", "b"),
        status=RunnerStatus.READY, memory_bytes=1000, decoded_tokens=decoded, compute_s=compute,
        collective_s=collective, collective_transport="shm" if sharding == "tensor" else None,
    )  # fmt: skip


def test_bench_splits_each_nodes_time_into_compute_and_transport() -> None:
    before = {"a": report((0, 2), "pipeline", 10, 1.0, 0), "b": report((2, 4), "pipeline", 10, 2.0, 0)}
    after = {"a": report((0, 2), "pipeline", 110, 1.5, 0), "b": report((2, 4), "pipeline", 110, 3.0, 0)}
    nodes = per_node(before, after, [], e2e_ms=20.0)
    # 5 ms and 10 ms of compute per token; the other 5 ms of each 20 ms step are hand-offs
    assert nodes["a"]["compute_ms_per_token"] == 5.0 and nodes["b"]["compute_ms_per_token"] == 10.0
    assert nodes["a"]["transport_ms_per_token"] == nodes["b"]["transport_ms_per_token"] == 2.5
    tensor = per_node(
        {"a": report((0, 4), "tensor", 0, 0.0, 0.0)}, {"a": report((0, 4), "tensor", 100, 2.0, 0.5)}, [], 20.0
    )
    assert tensor["a"]["compute_ms_per_token"] == 15.0 and tensor["a"]["transport_ms_per_token"] == 5.0
