"""The job group's consumers do not pile up: Redis makes one per worker process that ever
read a job and never drops it, so a deployment that restarts or scales its workers would grow
the group (and every XINFO of it) without bound.

- A worker that stops cleanly leaves the group.
- A GC sweep retires the consumers of workers whose heartbeat is gone, but only once they
  hold no pending job: ``XGROUP DELCONSUMER`` would drop a held job with the consumer, and
  that job would never be claimed again.

On fakeredis and on a real redis-server (``any_cluster``).
"""

from __future__ import annotations

from typing import Any

from coordinator.codec import text
from coordinator.keys import JOB_GROUP
from coordinator.models import Finished, Paused
from coordinator.states import Phase


async def consumers(reg: Any) -> set[str]:
    return {text(c["name"]) for c in await reg.client.xinfo_consumers(reg.keys.jobs,
                                                                       JOB_GROUP)}


async def test_a_worker_stopping_cleanly_leaves_the_job_group(any_cluster: Any) -> None:
    reg = any_cluster.registry()
    leaving = await any_cluster.worker()
    sid, ev = await reg.start_execution("reflect", {"task": "t"})
    while isinstance(ev, Paused):
        ev = await reg.feed_response(sid, ev.queries[0].id, "fine")
    assert isinstance(ev, Finished) and ev.state is Phase.COMPLETED
    assert leaving.id in await consumers(reg)  # it ran the session's jobs
    staying = await any_cluster.worker()

    await any_cluster.stop_worker(leaving)

    assert leaving.id not in await consumers(reg)
    assert await consumers(reg) <= {staying.id}


async def test_gc_retires_dead_workers_consumers_once_they_hold_no_job(any_cluster: Any) -> None:
    reg = any_cluster.registry()
    r, jobs = reg.client, reg.keys.jobs
    await r.xgroup_create(jobs, JOB_GROUP, id="$", mkstream=True)
    # A dead worker that held nothing, a dead one still holding a job, and a live one (its
    # heartbeat key is there) that holds nothing.
    await r.xgroup_createconsumer(jobs, JOB_GROUP, "dead-idle")
    entry = await r.xadd(jobs, {"kind": "noop"})
    got = await r.xreadgroup(JOB_GROUP, "dead-holding", {jobs: ">"}, count=1)
    assert got and got[0][1][0][0] == entry
    await r.xgroup_createconsumer(jobs, JOB_GROUP, "alive")
    await r.set(reg.keys.worker("alive"), 1)

    assert await reg.gc_sweep() == []
    assert await consumers(reg) == {"dead-holding", "alive"}
    pending = await r.xpending_range(jobs, JOB_GROUP, "-", "+", 10)
    assert [(p["message_id"], text(p["consumer"])) for p in pending] == [
        (entry, "dead-holding")], "the held job must survive the sweep"

    # Once another worker has claimed the job away, the dead consumer goes too.
    claimed = await r.xclaim(jobs, JOB_GROUP, "alive", 0, [entry])
    assert [c[0] for c in claimed] == [entry]
    assert await reg.gc_sweep() == []
    assert await consumers(reg) == {"alive"}


async def test_a_sweep_before_any_worker_ever_ran_is_harmless(any_cluster: Any) -> None:
    reg = any_cluster.registry()
    assert await reg.client.exists(reg.keys.jobs) == 0
    assert await reg.gc_sweep() == []
    assert await reg.client.exists(reg.keys.jobs) == 0
