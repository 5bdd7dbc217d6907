"""The nodes' downloads as `/state.downloads` shows them, in EXO's shape: per node a list of
`{"DownloadPending" | "DownloadOngoing" | "DownloadCompleted" | "DownloadFailed": {...}}` with
`nodeId`, `shardMetadata` and, while it runs, `downloadProgress` (bytes as `{"inBytes": n}`).
Torch-free; the reports are what `hub_fetch.Download.to_wire()` sends.
"""

from __future__ import annotations

from typing import Any

from exoctl.cluster.views import NodeStatus

TAGS = {
    "pending": "DownloadPending",
    "ongoing": "DownloadOngoing",
    "completed": "DownloadCompleted",
    "failed": "DownloadFailed",
}
_INTS = ("start_layer", "end_layer", "n_layers", "total", "downloaded", "downloaded_this_session")


def is_download(raw: Any) -> bool:
    """A report this exoctl can read (a node's answer is checked before it is shown)."""
    return (
        isinstance(raw, dict)
        and isinstance(raw.get("id"), str)
        and isinstance(raw.get("model"), str)
        and raw.get("state") in TAGS
        and all(isinstance(raw.get(k), int) and not isinstance(raw.get(k), bool) for k in _INTS)
        and isinstance(raw.get("files"), dict)
    )


def _bytes(n: int) -> dict[str, int]:
    return {"inBytes": int(n)}


def progress_doc(report: dict[str, Any]) -> dict[str, Any]:
    files = {
        name: {
            "total": _bytes(f.get("total", 0)),
            "downloaded": _bytes(f.get("downloaded", 0)),
            "downloadedThisSession": _bytes(f.get("downloaded_this_session", 0)),
        }
        for name, f in report["files"].items()
        if isinstance(f, dict)
    }
    return {
        "total": _bytes(report["total"]),
        "downloaded": _bytes(report["downloaded"]),
        "downloadedThisSession": _bytes(report["downloaded_this_session"]),
        "completedFiles": int(report.get("completed_files") or 0),
        "totalFiles": int(report.get("total_files") or 0),
        "speed": float(report.get("speed") or 0.0),
        "etaMs": int(report.get("eta_ms") or 0),
        "files": files,
    }


def download_doc(node: str, report: dict[str, Any]) -> dict[str, Any]:
    body: dict[str, Any] = {
        "nodeId": node,
        "downloadId": report["id"],
        "modelId": report["model"],
        "instanceId": report.get("instance_id"),
        "shardMetadata": {
            "PipelineShardMetadata": {
                "modelId": report["model"],
                "startLayer": report["start_layer"],
                "endLayer": report["end_layer"],
                "nLayers": report["n_layers"],
                "deviceRank": 0,
                "worldSize": 1,
            }
        },
        "modelDirectory": report.get("path") or "",
        "startedAt": report.get("started_at") if isinstance(report.get("started_at"), int | float) else None,
    }
    state = report["state"]
    if state == "ongoing":
        body["downloadProgress"] = progress_doc(report)
    elif state == "pending":
        body.update(downloaded=_bytes(report["downloaded"]), total=_bytes(report["total"]))
    elif state == "completed":
        body.update(total=_bytes(report["total"]), readOnly=False)
    else:
        body["errorMessage"] = report.get("error") or "download failed"
        if report.get("hint"):
            body["hint"] = report["hint"]
    return {TAGS[state]: body}


def downloads_document(statuses: list[NodeStatus]) -> dict[str, list[dict[str, Any]]]:
    return {s.node.name: [download_doc(s.node.name, d) for d in s.downloads] for s in statuses if s.up}
