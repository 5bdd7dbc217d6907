"""The nodes' downloads as `/state.downloads` shows them, in EXO's shape: per node a list of
`{"DownloadPending" | "DownloadOngoing" | "DownloadCompleted" | "DownloadFailed": {...}}` with
`nodeId`, `shardMetadata` and, while it runs, `downloadProgress` (bytes as `{"inBytes": n}`).
Torch-free; each from a node's `DownloadReport`.
"""

from __future__ import annotations

from typing import Any

from exoctl.cluster.views import NodeStatus
from exoctl.wire.download_report import DownloadReport

TAGS = {
    "pending": "DownloadPending",
    "ongoing": "DownloadOngoing",
    "completed": "DownloadCompleted",
    "failed": "DownloadFailed",
}


def _bytes(n: int) -> dict[str, int]:
    return {"inBytes": int(n)}


def progress_doc(report: DownloadReport) -> dict[str, Any]:
    files = {
        name: {
            "total": _bytes(f.total),
            "downloaded": _bytes(f.downloaded),
            "downloadedThisSession": _bytes(f.downloaded_this_session),
        }
        for name, f in report.files.items()
    }
    return {
        "total": _bytes(report.total),
        "downloaded": _bytes(report.downloaded),
        "downloadedThisSession": _bytes(report.downloaded_this_session),
        "completedFiles": report.completed_files,
        "totalFiles": report.total_files,
        "speed": report.speed,
        "etaMs": report.eta_ms,
        "files": files,
    }


def download_doc(node: str, report: DownloadReport) -> dict[str, Any]:
    body: dict[str, Any] = {
        "nodeId": node,
        "downloadId": report.id,
        "modelId": report.model,
        "instanceId": report.instance_id,
        "shardMetadata": {
            "PipelineShardMetadata": {
                "modelId": report.model,
                "startLayer": report.start_layer,
                "endLayer": report.end_layer,
                "nLayers": report.n_layers,
                "deviceRank": 0,
                "worldSize": 1,
            }
        },
        "modelDirectory": report.path,
        "startedAt": report.started_at,
    }
    state = report.state
    if state == "ongoing":
        body["downloadProgress"] = progress_doc(report)
    elif state == "pending":
        body.update(downloaded=_bytes(report.downloaded), total=_bytes(report.total))
    elif state == "completed":
        body.update(total=_bytes(report.total), readOnly=False)
    else:
        body["errorMessage"] = report.error or "download failed"
        if report.hint:
            body["hint"] = report.hint
    return {TAGS[state]: body}


def downloads_document(statuses: list[NodeStatus]) -> dict[str, list[dict[str, Any]]]:
    return {s.node.name: [download_doc(s.node.name, d) for d in s.downloads] for s in statuses if s.up}
