"""The original server's `list_recent_messages`, copied: a full scan of every key starting ``chat:``
and containing ``:msg:``, each value deserialised, the top `limit` kept by (ts, scan sequence) in a
min-heap, returned ts descending then id ascending (`src/db/mod.rs`, original §6.3)."""

from __future__ import annotations

import heapq
import json

from rocksdict import Rdict


def list_recent_messages(db: Rdict, limit: int) -> list[dict]:
    if limit == 0:
        return []
    heap: list[tuple[int, int, dict]] = []
    sequence = 0
    for key, value in db.items(from_key=b"chat:"):
        if not key.startswith(b"chat:"):
            break
        if b":msg:" not in key:
            continue
        message = json.loads(value)
        entry = (message["ts"], sequence, message)
        sequence += 1
        if len(heap) < limit:
            heapq.heappush(heap, entry)
        elif entry[:2] > heap[0][:2]:
            heapq.heapreplace(heap, entry)
    out = [m for _, _, m in heap]
    out.sort(key=lambda m: (-m["ts"], m["id"]))
    return out
