"""Benchmark 1, bulk submission: a 50,000-task sweep submitted by fanout (Planner,
Submitter and AzureBatchBackend) to the Batch peer with 50 ms added per request,
against the bare ``azure.batch.BatchClient.create_tasks`` with the same tasks already
built and the same concurrency, and against the floor (requests x latency /
concurrency). The peer runs in its own process, restarted for every measurement.

Arms: ``python -m tests.bench.submission fanout|sdk URL ACCOUNT KEY TASKS CONCURRENCY``.
"""

from __future__ import annotations

import math
import os
import sys
import time
import uuid
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

from tests.bench.common import Figure, PeerProcess, arm, emit, median, quiet_logs

TASKS = 50_000
CONCURRENCY = 16
LATENCY = 0.05
PER_REQUEST = 100


def _planner(home: Path) -> Any:
    from worker.app import make_planner, make_storage
    from worker.config import load_settings
    from worker.routing import HandlerRegistry, Router

    empty = home / "empty.toml"
    empty.write_text("")
    settings = load_settings(empty, overrides={
        "home": str(home), "limits": {"max_tasks_per_message": 1_000_000},
        "backend": {"default_pool": "fanout"},
        "programs": {"sim": {"command": "python3 sim.py --alpha {alpha} --beta {beta}"}}})
    storage = make_storage(settings)
    router = Router(registry=HandlerRegistry.from_entry_points(), routes=[], storage=storage)
    return make_planner(settings, router, storage)


def _body(tasks: int) -> bytes:
    import json

    return json.dumps({"handler": "sweep", "id": uuid.uuid4().hex, "params": {
        "program": "sim", "parameters": {"alpha": {"start": 0, "stop": tasks // 100},
                                         "beta": {"start": 0, "stop": 100}}}}).encode()


def arm_fanout(url: str, account: str, key: str, tasks: int, concurrency: int) -> None:
    """Plan and submit the sweep the way the daemon does; time all of it."""
    from azure.core.credentials import AzureNamedKeyCredential
    from prometheus_client import CollectorRegistry

    from worker.backends.azure import AzureBatchBackend
    from worker.config import SubmitConfig
    from worker.metrics import Metrics
    from worker.submit import Submitter

    quiet_logs()
    with TemporaryDirectory() as tmp:
        planner = _planner(Path(tmp))
        backend = AzureBatchBackend(endpoint=url, credential=AzureNamedKeyCredential(
            account, key), default_pool="fanout", connections=concurrency + 2)
        submitter = Submitter(backend=backend, config=SubmitConfig(
            concurrency=concurrency, chunk_size=PER_REQUEST),
            metrics=Metrics(registry=CollectorRegistry()))
        backend.probe()  # connect once, as a running daemon has
        cpu, started = time.process_time(), time.perf_counter()
        (planned,) = planner.plan(_body(tasks), message_id="bench").jobs
        result = submitter.submit(planned.job, handler="sweep")
        seconds = time.perf_counter() - started
        cpu = time.process_time() - cpu
        submitter.close()
        backend.close()
    assert result.added == tasks, result
    emit({"seconds": seconds, "cpu": cpu, "requests": result.requests})


def arm_sdk(url: str, account: str, key: str, tasks: int, concurrency: int) -> None:
    """``BatchClient.create_tasks`` with the same tasks, built before the clock starts."""
    from azure.batch import BatchClient, models
    from azure.core.credentials import AzureNamedKeyCredential

    with TemporaryDirectory() as tmp:
        (planned,) = _planner(Path(tmp)).plan(_body(tasks), message_id="bench").jobs
        prebuilt = [models.BatchTaskCreateOptions(
            id=t.id, command_line=t.command_line,
            environment_settings=[models.EnvironmentSetting(name=k, value=v)
                                  for k, v in t.environment.items()])
            for t in planned.job.tasks]
    client = BatchClient(url, AzureNamedKeyCredential(account, key))
    job_id = f"sdk-{uuid.uuid4().hex[:12]}"
    client.create_job(models.BatchJobCreateOptions(
        id=job_id, pool_info=models.BatchPoolInfo(pool_id="fanout")))
    cpu, started = time.process_time(), time.perf_counter()
    result = client.create_tasks(job_id, prebuilt, max_concurrency=concurrency)
    seconds = time.perf_counter() - started
    cpu = time.process_time() - cpu
    ok = sum(1 for r in result.result_values or [] if str(r.status).lower().endswith("success"))
    client.close()
    assert ok == tasks, f"{ok} of {tasks} added"
    emit({"seconds": seconds, "cpu": cpu, "requests": math.ceil(tasks / PER_REQUEST)})


def run(runs: int = 3, tasks: int = TASKS, concurrency: int = CONCURRENCY,
        latency: float = LATENCY) -> list[Figure]:
    """Median of ``runs`` fresh-process measurements of each arm, alternating."""
    fanout: list[dict[str, Any]] = []
    sdk: list[dict[str, Any]] = []
    for i in range(runs):
        for name in (("fanout", "sdk") if i % 2 == 0 else ("sdk", "fanout")):
            with PeerProcess(latency=latency) as peer:
                before = peer.cpu_seconds()  # its start-up (imports) is not the arm's
                result = arm("submission", name, *peer.args(), tasks, concurrency)
                result["peer_cpu"] = peer.cpu_seconds() - before
            (fanout if name == "fanout" else sdk).append(result)
    requests = math.ceil(tasks / PER_REQUEST)
    floor = requests * latency / concurrency
    f_runs = [r["seconds"] for r in fanout]
    s_runs = [r["seconds"] for r in sdk]
    f_cpu = [r["cpu"] / tasks * 1e6 for r in fanout]
    s_cpu = [r["cpu"] / tasks * 1e6 for r in sdk]
    label = f"{tasks:,} tasks, {concurrency} in flight, {latency * 1000:.0f} ms/request"
    extra = {"tasks": tasks, "concurrency": concurrency, "latency_s": latency,
             "requests": requests, "floor_s": floor,
             "fanout_cpu_s": median([r["cpu"] for r in fanout]),
             "sdk_cpu_s": median([r["cpu"] for r in sdk]),
             "fanout_tasks_per_s": tasks / median(f_runs), **_peer(fanout, sdk, tasks)}
    return [
        Figure("submission", f"fanout vs bare SDK ({label})", median(f_runs),
               "BatchClient.create_tasks", median(s_runs), "s", target=0.5,
               runs=f_runs, baseline_runs=s_runs, extra=extra),
        Figure("submission", f"fanout vs floor ({label})", median(f_runs),
               "requests x latency / concurrency", floor, "s", target=1.3, runs=f_runs,
               note="fanout also plans the sweep, creates the job, checks the pool and "
                    "seals (3 requests)"),
        Figure("submission", f"client CPU per task ({label})", median(f_cpu),
               "BatchClient.create_tasks", median(s_cpu), "µs", target=0.25,
               runs=f_cpu, baseline_runs=s_cpu,
               note="process CPU (user + system) of the client while timed; the peer's "
                    "is in extra"),
    ]


def _peer(fanout: list[dict[str, Any]], sdk: list[dict[str, Any]],
          tasks: int) -> dict[str, Any]:
    """The peer's CPU while each arm ran, apart, and the least wall time the two
    processes' CPU allows: each runs its Python on one core at a time (one GIL), and
    both share the machine's cores, so a run takes at least
    ``max(client, peer, (client + peer) / cores)`` (other processes' load aside)."""
    out: dict[str, Any] = {}
    cores = os.cpu_count() or 1
    for name, runs in (("fanout", fanout), ("sdk", sdk)):
        seconds = [r["peer_cpu"] for r in runs]
        out[f"peer_cpu_s_{name}"] = median(seconds)
        out[f"peer_cpu_us_per_task_{name}"] = median(seconds) / tasks * 1e6
        out[f"peer_cpu_s_{name}_runs"] = [round(s, 3) for s in seconds]
        out[f"cpu_bound_s_{name}"] = median([
            max(r["cpu"], r["peer_cpu"], (r["cpu"] + r["peer_cpu"]) / cores) for r in runs])
    return out


if __name__ == "__main__":
    which, url, account, key, n, conc = sys.argv[1:7]
    {"fanout": arm_fanout, "sdk": arm_sdk}[which](url, account, key, int(n), int(conc))
