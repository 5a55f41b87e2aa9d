"""The results file the test plugin writes and the test stage reads: one JSON object per line.

    {"event": "selected", "nodeids": [...], "modules": [...]}   first attempt of a shard
    {"event": "start", "nodeid": ..., "t": unix time}
    {"event": "end", "nodeid": ..., "t": ..., "outcome": ..., "duration": s, "message": ...}

Shared by both sides so that neither needs the other's imports (pytest may be missing where the
stage runs; the stage then reports that instead).
"""

from __future__ import annotations

import json
import os

STICKY_EXIT = 86  # the plugin's exit status for "restart me in a fresh process" (pytest's own are 0-5)


def append(path: str, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def read(path: str) -> list:
    """Every record, skipping a last line cut short by a kill."""
    out = []
    if not path or not os.path.exists(path):
        return out
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def recorded(path: str) -> dict:
    """nodeid -> its end record, or its start record when it never ended."""
    out: dict = {}
    for rec in read(path):
        if rec.get("event") == "end" or (rec.get("event") == "start" and rec["nodeid"] not in out):
            out[rec["nodeid"]] = rec
    return out


def selected(path: str) -> list:
    return next((r["nodeids"] for r in read(path) if r.get("event") == "selected"), [])
