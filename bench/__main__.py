"""``python -m bench``: the whole benchmark in one run, beside its Redis floor and its peers.

Starts its own redis-server on a free loopback port and real worker processes, measures,
prints a table, and writes ``bench/results/<timestamp>.json``, ``latest.json``, ``latest.md``
and ``latest.png`` (with ``--readme``, also the table between the bench markers of README.md).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import platform
import subprocess
import sys
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from coordinator import SessionRegistry
from tests.redis_proc import RedisProcess
from tests.topology import ClusterGroup, SentinelGroup

from . import coord, floor, recovery, state
from .procs import workers
from .stats import Latency

RESULTS = Path(__file__).resolve().parent / "results"
README = Path(__file__).resolve().parent.parent / "README.md"


def _versions() -> dict[str, str]:
    import hiredis
    import msgpack
    import redis

    server = subprocess.run(["redis-server", "--version"], capture_output=True, text=True)
    return {
        "python": platform.python_version(),
        "redis-server": server.stdout.split()[2].removeprefix("v=") if server.stdout else "?",
        "redis-py": redis.__version__,
        "hiredis": hiredis.__version__,
        "msgpack": ".".join(map(str, msgpack.version)),
    }


async def _registry(url: str, ns: str) -> SessionRegistry:
    reg = SessionRegistry.from_url(url, namespace=ns)
    await reg.client.flushall()
    return reg


async def run(args: argparse.Namespace, url: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    q = args.quick

    print("floor ...", file=sys.stderr)
    ps_lat, _ = await floor.pubsub_rtt(url, 500 if q else 5000)
    _, ps_tput = await floor.pubsub_rtt(url, 2000 if q else 20000, concurrency=50)
    out["floor"] = {"pubsub": asdict(ps_lat), "list": asdict(await floor.list_rtt(url, 500 if q
                                                                                  else 5000)),
                    "pubsub_tput_50": ps_tput}

    print("step latency ...", file=sys.stderr)
    n_lat = 20 if q else 100
    with workers(url, "bl", 1):
        reg = await _registry(url, "bl")
        live = await coord.step_latency(reg, n_lat)
        batch = await coord.step_latency(reg, n_lat // 2, strategy="bench-batch", width=4)
        await reg.aclose()
    with workers(url, "br", 1, env={"ALC_MAX_LIVE_EXECUTIONS": "0"}):
        reg = await _registry(url, "br")
        replay = await coord.step_latency(reg, n_lat // 2)
        await reg.aclose()
    out["latency"] = {"live": asdict(live.step), "start": asdict(live.start),
                      "batch4": asdict(batch.step), "replay": asdict(replay.step)}

    print("throughput ...", file=sys.stderr)
    tput: dict[str, float] = {}
    for n_workers in (1, 2, 4):
        with workers(url, "bt", n_workers):
            reg = await _registry(url, "bt")
            for inflight in (50, 500):
                tput[f"{inflight}x{n_workers}"] = await coord.throughput(
                    reg, inflight, 3 if q else 8)
            await reg.aclose()
    out["throughput"] = tput

    print("recovery ...", file=sys.stderr)
    out["recovery"] = await recovery.measure(url, trials=3 if q else 10)

    print("state ...", file=sys.stderr)
    out["state"] = await _state(url, q)

    out["peers"] = await _peers(url, args)

    # Beside the single node: each on its own topology; one failing to start (no
    # redis-server >= 7 for a cluster, no free ports, ...) leaves its rows out, not the run.
    sentinel = await _sentinel(q)
    if sentinel is not None:
        out["sentinel"] = sentinel
    cluster = await _cluster(q)
    if cluster is not None:
        out["cluster"] = cluster
    return out


async def _sentinel(quick: bool) -> dict[str, Any] | None:
    from . import sentinel

    async def measure(group: Any) -> dict[str, Any]:
        res = await sentinel.measure(group, 10 if quick else 40)
        return {k: asdict(v) for k, v in res.items()}

    return await _on_topology("Sentinel", SentinelGroup, measure)


async def _cluster(quick: bool) -> dict[str, Any] | None:
    from . import cluster

    async def measure(group: Any) -> dict[str, Any]:
        return await cluster.measure(group, sessions=50, seconds=3 if quick else 8,
                                     pings=500 if quick else 2000)

    return await _on_topology("Cluster", ClusterGroup, measure)


async def _on_topology(name: str, make: Callable[[], Any],
                       measure: Callable[[Any], Awaitable[dict[str, Any]]]
                       ) -> dict[str, Any] | None:
    """``measure`` on a topology of its own (``tests.topology``); a topology that does not
    start or a run that fails costs its rows only, never the single-node results."""
    print(f"{name.lower()} ...", file=sys.stderr)
    try:
        group = make()
        group.start()
    except Exception as exc:
        print(f"warning: no {name} rows, it did not start: {type(exc).__name__}: {exc}",
              file=sys.stderr)
        return None
    try:
        return await measure(group)
    except Exception as exc:
        print(f"warning: no {name} rows, the run failed: {type(exc).__name__}: {exc}",
              file=sys.stderr)
        return None
    finally:
        group.close()


async def _state(url: str, quick: bool) -> dict[str, Any]:
    res: dict[str, Any] = {"list_snapshots_ms": {}}
    sizes = (1000, 10_000) if quick else (1000, 10_000, 100_000)
    with workers(url, "bs", 2):
        reg = await _registry(url, "bs")
        have: list[str] = []
        for size in sizes:
            have += await state.populate(reg, size - len(have))
            seconds, count = await state.snapshot_time(reg, 3 if size > 10_000 else 5)
            res["list_snapshots_ms"][str(count)] = seconds * 1000
            if size == 10_000:
                # Alone, beside the observer, and beside three controls: the cheapest reader
                # of the same sessions, the best case of a snapshot index, and a process that
                # only spins a core.
                feeds = await state.feed_beside_neighbours(reg, url, 300 if quick else 1000,
                                                           1 if quick else 3)
                res["feed_alone"] = feeds.pop("alone")
                res["feed_beside_list"] = feeds.pop("list")
                res["listings_meanwhile"] = res["feed_beside_list"]["loops"]
                for kind, lat in feeds.items():
                    res[f"feed_beside_{kind}"] = lat
                res["memory"] = await state.memory_per_session(reg, have)
        await reg.aclose()
    res["replay_us_per_round"] = {
        str(r): await state.replay_per_round(r) * 1e6 for r in (10, 100, 1000)
    }
    return res


async def _peers(url: str, args: argparse.Namespace) -> dict[str, Any]:
    if args.no_peers:
        return {"skipped": "--no-peers"}
    try:
        from . import peers
    except ImportError as exc:
        return {"skipped": f"bench.peers not importable: {exc}"}
    results: dict[str, Any] = {}
    for name, missing in peers.available().items():
        if missing:
            results[name] = {"skipped": missing}
            continue
        print(f"peer {name} ...", file=sys.stderr)
        try:
            r = await peers.run(name, url=url, quick=args.quick)
            results[name] = {"latency": asdict(r.latency), "throughput": r.throughput,
                             "notes": r.notes, "durable": r.durable}
        except Exception as exc:  # a peer failing must not sink the whole run
            results[name] = {"skipped": f"failed: {type(exc).__name__}: {exc}"}
    return results


def targets(r: dict[str, Any]) -> list[tuple[str, str, bool]]:
    fl = r["floor"]["pubsub"]["p50_ms"]
    live = r["latency"]["live"]
    t50x2 = r["throughput"].get("50x2", 0.0)
    floor_t = r["floor"]["pubsub_tput_50"]
    st = r["state"]
    out = [
        ("live p50 <= 2x floor pub/sub p50",
         f"{live['p50_ms']:.3f} ms vs {2 * fl:.3f} ms", live["p50_ms"] <= 2 * fl),
        ("live p99 <= 3 ms", f"{live['p99_ms']:.3f} ms", live["p99_ms"] <= 3.0),
        ("50 sessions, 2 workers >= 2000 steps/s", f"{t50x2:.0f}/s", t50x2 >= 2000),
        (">= 40% of the floor's throughput (same host shape)",
         f"{t50x2:.0f} vs {0.4 * floor_t:.0f}/s", t50x2 >= 0.4 * floor_t),
        ("list_snapshots over 10k < 100 ms",
         f"{st['list_snapshots_ms'].get('10000', float('nan')):.1f} ms",
         st["list_snapshots_ms"].get("10000", 1e9) < 100),
        ("feed p99 beside list_snapshots <= 2x alone",
         f"{st['feed_beside_list']['p99_ms']:.2f} vs {st['feed_alone']['p99_ms']:.2f} ms",
         st["feed_beside_list"]["p99_ms"] <= 2 * st["feed_alone"]["p99_ms"]),
        ("<= 2 KiB per paused session beyond its prompt",
         f"{st['memory']['beyond_prompt']:.0f} B", st["memory"]["beyond_prompt"] <= 2048),
    ]
    worst = [rc["affected"]["max_ms"] for rc in r.get("recovery", {}).values()
             if rc["affected"]["n"]]
    if worst:
        out.append(("a killed worker's sessions resume within 1 s (max kill -> next event)",
                    f"{max(worst):.0f} ms", max(worst) <= 1000))
    durable = [(n, p) for n, p in r["peers"].items()
               if isinstance(p, dict) and p.get("durable") and "throughput" in p]
    if durable:
        name, best = max(durable, key=lambda np: max(np[1]["throughput"].values()))
        best_t = max(best["throughput"].values())
        out.append((f">= 3x the best durable peer's throughput ({name})",
                    f"{t50x2:.0f} vs {3 * best_t:.0f}/s", t50x2 >= 3 * best_t))
        out.append((f"<= 1/3 of its p50 ({name})",
                    f"{live['p50_ms']:.3f} vs {best['latency']['p50_ms'] / 3:.3f} ms",
                    live["p50_ms"] <= best["latency"]["p50_ms"] / 3))
    return out


def _recovery_rows(rec: dict[str, Any], lat: Callable[[dict[str, Any]], str]) -> list[str]:
    rows = []
    for mode, label in (("kill", "killed mid-run"),
                        ("freeze", "killed with rounds handed to it")):
        if mode in rec:
            rc = rec[mode]
            rows.append(f"| recovery: SIGKILL one of 2 workers ({label}), kill -> next event "
                        f"of each session it was stepping ({rc['affected']['n']} over "
                        f"{rc['trials']} runs; default lease 10 s) | {lat(rc['affected'])} |")
    return rows


def _topology_rows(r: dict[str, Any]) -> list[str]:
    """The Sentinel and Cluster rows, under a heading each (absent when not measured)."""
    lines: list[str] = []
    if "sentinel" in r:
        from . import sentinel

        lines.append("| **Sentinel** (a primary, a replica, three sentinels) | |")
        lines += sentinel.rows({k: Latency(**v) for k, v in r["sentinel"].items()})
    if "cluster" in r:
        from . import cluster

        c = r["cluster"]
        lines.append(f"| **Cluster ({c['primaries']} primaries, {c['shards']} shards)** | |")
        lines += cluster.rows(c)
    return lines


def table(r: dict[str, Any], meta: dict[str, Any]) -> str:
    def lat(x: dict[str, Any]) -> str:
        return f"{x['p50_ms']:.3f} / {x['p99_ms']:.3f} / {x['max_ms']:.3f}"

    lines = [f"Benchmark {meta['date']} on {meta['machine']} ({meta['cpus']} cores); "
             + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()), "",
             "| measurement | p50 / p99 / max (ms) or value |", "| --- | --- |"]
    lines.append(f"| floor: pub/sub round trip | {lat(r['floor']['pubsub'])} |")
    lines.append(f"| floor: LPUSH/BLPOP round trip | {lat(r['floor']['list'])} |")
    lines.append(f"| floor: pub/sub throughput, 50 in flight | "
                 f"{r['floor']['pubsub_tput_50']:.0f} round trips/s |")
    for key, label in (("live", "step, live path"), ("replay", "step, replay path (forced)"),
                       ("batch4", "step, batches of 4 (last answer -> next batch)"),
                       ("start", "start_execution -> first question")):
        lines.append(f"| {label} | {lat(r['latency'][key])} |")
    for key, value in r["throughput"].items():
        inflight, n_workers = key.split("x")
        lines.append(f"| throughput, {inflight} sessions, {n_workers} worker(s) | "
                     f"{value:.0f} steps/s |")
    lines += _recovery_rows(r.get("recovery", {}), lat)
    st = r["state"]
    for n, ms in st["list_snapshots_ms"].items():
        lines.append(f"| list_snapshots, {n} paused sessions | {ms:.1f} ms |")
    lines.append(f"| feed, 10k paused, alone | {lat(st['feed_alone'])} |")
    lines.append(f"| feed, 10k paused, while another process lists them in a loop "
                 f"({st.get('listings_meanwhile', '?')} listings) | "
                 f"{lat(st['feed_beside_list'])} |")
    for kind, label in (("read", "reads one field of each in a loop (bare socket + "
                                 "hiredis: the floor of any listing)"),
                        ("blob", "reads all 10k snapshots prebuilt in one key (one GET, "
                                 "decoded: the best case of a snapshot index)"),
                        ("spin", "only spins a core (no Redis at all)")):
        if f"feed_beside_{kind}" in st:
            x = st[f"feed_beside_{kind}"]
            rounds = "control" if kind == "spin" else f"{x['loops']} loops"
            lines.append(f"| feed, 10k paused, while another process {label} ({rounds}) | "
                         f"{lat(x)} |")
    lines.append(f"| Redis memory per paused session (200-char prompt) | "
                 f"{st['memory']['bytes']:.0f} B ({st['memory']['beyond_prompt']:.0f} B beyond "
                 "the prompt) |")
    for n, us in st["replay_us_per_round"].items():
        lines.append(f"| replay, journal of {n} rounds | {us:.1f} µs per round |")
    for name, p in r["peers"].items():
        if isinstance(p, dict) and "latency" in p:
            tp = ", ".join(f"{k}: {v:.0f}/s" for k, v in p["throughput"].items())
            lines.append(f"| peer {name} | {lat(p['latency'])}; {tp} |")
        elif isinstance(p, dict):
            lines.append(f"| peer {name} | skipped: {p.get('skipped')} |")
    lines += _topology_rows(r)
    lines += ["", "| target | measured | met |", "| --- | --- | --- |"]
    for name, measured, ok in targets(r):
        lines.append(f"| {name} | {measured} | {'yes' if ok else 'NO'} |")
    return "\n".join(lines)


def plot(r: dict[str, Any], path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not installed (pip install -e '.[bench]'): no plot"
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    series = {"floor pub/sub": r["floor"]["pubsub"], "live step": r["latency"]["live"],
              "replay step": r["latency"]["replay"], "start": r["latency"]["start"]}
    for name, p in r["peers"].items():
        if isinstance(p, dict) and "latency" in p:
            series[name] = p["latency"]
    names = list(series)
    xs = range(len(names))
    a.bar([x - 0.2 for x in xs], [series[n]["p50_ms"] for n in names], 0.4, label="p50")
    a.bar([x + 0.2 for x in xs], [series[n]["p99_ms"] for n in names], 0.4, label="p99")
    a.set_xticks(list(xs), names, rotation=30, ha="right")
    a.set_ylabel("ms")
    a.set_yscale("log")
    a.set_title("step latency")
    a.legend()
    for inflight in (50, 500):
        pts = sorted((int(k.split("x")[1]), v) for k, v in r["throughput"].items()
                     if k.startswith(f"{inflight}x"))
        b.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
               label=f"{inflight} sessions")
    b.axhline(r["floor"]["pubsub_tput_50"], ls="--", c="grey", label="floor (50 in flight)")
    b.set_xlabel("worker processes")
    b.set_ylabel("steps/s")
    b.set_title("throughput")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return None


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench")
    p.add_argument("--quick", action="store_true", help="smaller sizes (a smoke run)")
    p.add_argument("--no-peers", action="store_true")
    p.add_argument("--readme", action="store_true", help="write the table into README.md")
    args = p.parse_args()
    now = dt.datetime.now(dt.UTC)
    meta = {"date": now.strftime("%Y-%m-%d %H:%M UTC"), "machine": platform.platform(),
            "cpus": __import__("os").cpu_count(), "versions": _versions(),
            "quick": args.quick}
    with RedisProcess() as server:
        results = asyncio.run(run(args, server.url))
    RESULTS.mkdir(exist_ok=True)
    doc = {"meta": meta, "results": results,
           "targets": [{"target": t, "measured": m, "met": ok} for t, m, ok in targets(results)]}
    stamp = now.strftime("%Y%m%dT%H%M%SZ")
    for name in (f"{stamp}.json", "latest.json"):
        (RESULTS / name).write_text(json.dumps(doc, indent=2))
    text = table(results, meta)
    (RESULTS / "latest.md").write_text(text + "\n")
    note = plot(results, RESULTS / "latest.png")
    print(text)
    if note:
        print(note, file=sys.stderr)
    if args.readme:
        body = README.read_text()
        start, end = "<!-- bench:start -->", "<!-- bench:end -->"
        if start in body and end in body:
            head, rest = body.split(start, 1)
            _, tail = rest.split(end, 1)
            README.write_text(f"{head}{start}\n{text}\n{end}{tail}")


if __name__ == "__main__":
    main()

__all__ = ["Latency", "main"]
