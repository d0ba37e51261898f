"""``python -m bench.peers [NAME ...]``: run the peers (all available ones by default), each in
a fresh process, and print a line each (``--json``: one JSON object). ``--available`` prints
``available()`` as JSON and exits."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from . import PEERS, PeerConfig, _cfg_from_json, available, run_in_subprocess


async def _main(a: argparse.Namespace, cfg: PeerConfig) -> None:
    avail = available(cfg, python=sys.executable)
    out: dict[str, object] = {}
    for name in a.names or list(PEERS):
        reason = avail.get(name, "unknown peer")
        if reason:
            out[name] = {"skipped": reason}
            print(f"{name:<20} skipped: {reason}", file=sys.stderr)
            continue
        try:
            res = await run_in_subprocess(name, cfg)
        except Exception as e:  # one peer failing must not stop the others
            out[name] = {"skipped": f"failed: {type(e).__name__}: {e}"}
            print(f"{name:<20} failed: {e}", file=sys.stderr)
            continue
        out[name] = res.to_json()
        print(res.line(), file=sys.stderr)
        print(f"  {res.notes}", file=sys.stderr)
    if a.json:
        print(json.dumps(out))


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.peers")
    p.add_argument("names", nargs="*", help=f"peers to run, of {', '.join(PEERS)}")
    p.add_argument("--redis", default=PeerConfig().redis_url)
    p.add_argument("--pg", default=None)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--config", help="a whole PeerConfig as JSON")
    p.add_argument("--available", action="store_true")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    kw = {"redis_url": a.redis, **({"pg_url": a.pg} if a.pg else {})}
    if a.config:
        cfg = _cfg_from_json(json.loads(a.config))
    else:
        cfg = PeerConfig.quick(**kw) if a.quick else PeerConfig(**kw)
    if a.available:
        print(json.dumps(available(cfg if a.config else None, python=sys.executable)))
        return
    asyncio.run(_main(a, cfg))


if __name__ == "__main__":
    main()
