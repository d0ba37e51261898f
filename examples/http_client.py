"""A client of the HTTP API (``coordinator serve``) in a few lines of the standard library.

Start a worker and the API on a Redis, then run it:

    coordinator worker --redis redis://127.0.0.1:6379/0 &
    coordinator serve --redis redis://127.0.0.1:6379/0 --port 8000 &
    python examples/http_client.py reflect "Design a cache"

``ALC_API`` is the API's address (default ``http://127.0.0.1:8000``); ``ALC_API_TOKEN`` the
bearer token, if ``serve`` was given one. It answers each query with a canned echo and prints
the final event (the ``alc_continue`` JSON).
"""

from __future__ import annotations

import json
import os
import sys
import urllib.request
from typing import Any

API = os.environ.get("ALC_API", "http://127.0.0.1:8000").rstrip("/")


def post(path: str, body: dict[str, Any]) -> dict[str, Any]:
    """POST JSON, return JSON. An error status raises ``HTTPError``, whose body is the
    coordinator's ``{"status": "error", "error", "type"}``."""
    headers = {"Content-Type": "application/json"}
    if os.environ.get("ALC_API_TOKEN"):
        headers["Authorization"] = f"Bearer {os.environ['ALC_API_TOKEN']}"
    request = urllib.request.Request(API + path, json.dumps(body).encode(), headers)
    with urllib.request.urlopen(request, timeout=330) as response:
        out: dict[str, Any] = json.load(response)
        return out


def main(strategy: str, task: str) -> dict[str, Any]:
    event = post("/sessions", {"strategy": strategy, "input": {"task": task}})
    sid = event["session_id"]
    while event["status"] == "needs_response":
        # One query: its fields are on the event itself; several: in "queries".
        queries = event.get("queries") or [{"id": event["query_id"], **event}]
        answers = [{"query_id": q["id"], "response": "echo: " + q["prompt"].splitlines()[0]}
                   for q in queries]
        event = post(f"/sessions/{sid}/responses", {"responses": answers})
    return {"session_id": sid, **event}


if __name__ == "__main__":
    args = sys.argv[1:]
    result = main(args[0] if args else "cot", args[1] if len(args) > 1 else "What is 2+2?")
    print(json.dumps(result, indent=2))
    sys.exit(0 if result["status"] == "completed" else 1)
