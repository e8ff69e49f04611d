"""Secrets never leak: a real daemon configured with Azure-looking secrets (a Batch
account key it really signs with, a Service Bus connection string, a storage account
key and connection string) handles good messages, messages with SAS URLs, a fault
storm and a refused key; none of the secret values appears in its logs (JSON, at
debug level), its /metrics page, the dead-letter descriptions or the CLI's output.
"""

from __future__ import annotations

import base64
import json
import re
import secrets
import subprocess
import sys
from collections.abc import Callable
from typing import Any

from tests.fakes.batch_peer import BatchPeer, FaultPlan

from .conftest import batch_config
from .daemon import Daemon, wait_for


def secret_b64(n: int = 64) -> str:
    return base64.b64encode(secrets.token_bytes(n)).decode()


#: Fragments that show a secret was written out unredacted.
LEAKS = [
    re.compile(r"(?i)[?&]sig=(?!REDACTED)[^&\s\"']+"),
    re.compile(r"(?i)(AccountKey|SharedAccessKey)=(?!REDACTED)[^;\s\"']+"),
    re.compile(r"SharedKey [^:\s]+:(?!REDACTED)[A-Za-z0-9+/=]{16,}"),
]


def test_no_secret_in_logs_metrics_or_dead_letters(
        daemon: Callable[..., Daemon], batch_peer: Callable[..., BatchPeer]) -> None:
    """Every secret the worker holds or a message carries stays out of everything it
    writes, in success and in error paths."""
    batch_key = secret_b64()
    sb_key = secret_b64(32)
    blob_key = secret_b64()
    blob_key2 = secret_b64()
    sas_sig = base64.b64encode(secrets.token_bytes(32)).decode()
    sb_conn = ("Endpoint=sb://fanout-test.servicebus.windows.net/;"
               f"SharedAccessKeyName=RootManageSharedAccessKey;SharedAccessKey={sb_key}")
    blob_conn = ("DefaultEndpointsProtocol=https;AccountName=stfanouttest;"
                 f"AccountKey={blob_key2};EndpointSuffix=core.windows.net")
    values = [batch_key, sb_key, blob_key, blob_key2, sas_sig, sb_conn, blob_conn]

    peer = batch_peer(key=batch_key)
    d = daemon({
        "queue": {"kind": "local", "lock_duration": 2.0},  # configured, but not used
        "storage": {"kind": "local"},
        "servicebus": {"connection_string": sb_conn, "queue": "jobs"},
        "blob": {"account_url": "https://stfanouttest.blob.core.windows.net",
                 "account_key": blob_key, "connection_string": blob_conn},
        "batch": batch_config(peer),
        "consumer": {"receive_wait": 0.2, "unready_backoff": 0.2},
        "submit": {"backoff_base": 0.01, "backoff_max": 0.05},
        "log": {"level": "debug"},
        "programs": {"echo": {"command": "echo {value}"}},
    }).start()
    d.wait_started()
    sas = f"sv=2025-01-05&se=2030-01-01&sr=b&sp=r&sig={sas_sig}"

    def sweep(key: str, n: int = 50) -> dict[str, Any]:
        return {"handler": "sweep", "id": key, "params": {
            "program": "echo", "parameters": {"value": {"start": 0, "stop": n}}}}

    bad = [
        {"handler": "transcode", "params": {
            "input": f"https://stfanouttest.blob.core.windows.net/videos/a.mp4?{sas}"}},
        {"handler": "transcode", "params": {
            "input": f"https://evil.blob.core.windows.net/videos/a.mp4?{sas}"}},
        {"handler": "render", "params": {
            "scene": f"https://stfanouttest.blob.core.windows.net/s/a.blend?{sas}",
            "frames": {"start": 1, "end": 2}}},
        {"eventType": "Microsoft.Storage.BlobCreated", "id": "ev-sas",
         "subject": f"/blobServices/default/containers/videos/blobs/a.mp4?{sas}",
         "data": {"url": f"https://stfanouttest.blob.core.windows.net/videos/a.mp4?{sas}",
                  "api": "PutBlob"}},
        {"handler": "sweep", "params": {"program": f"x?{sas}", "parameters": {"v": [1]}}},
    ]
    d.send(sweep("good-1"))
    for body in bad:
        d.send(body)
    wait_for(lambda: d.metric("fanout_messages_total",
                              {"handler": "sweep", "outcome": "completed"}) == 1, 60, "good-1")
    # error paths: a storm of 429/503/dropped connections, then a refused key
    peer.set_faults(FaultPlan(throttle=0.1, unavailable=0.1, drop=0.1, seed=1))
    d.send(sweep("stormy", 500))
    wait_for(lambda: d.metric("fanout_messages_total",
                              {"handler": "sweep", "outcome": "completed"}) == 2, 60, "stormy")
    peer.set_faults(FaultPlan())
    peer.key = secret_b64()  # the account's key "rotated": fanout's is refused
    d.send(sweep("refused"))
    wait_for(lambda: peer.outcomes["auth_failed"] >= 2, 60, "refused requests")
    peer.key = batch_key
    wait_for(lambda: d.metric("fanout_messages_total",
                              {"handler": "sweep", "outcome": "completed"}) == 3, 60, "refused")
    wait_for(lambda: d.depth()["active"] == 0, 30, "an empty queue")
    metrics = d.metrics_text()
    assert d.stop(30) == 0

    logs = d.log_text()
    dead = d.dead_letters()
    assert len(dead) == len(bad)
    assert {x.reason for x in dead} == {"InvalidParams", "UnknownProgram"}
    descriptions = "\n".join(f"{x.reason} {x.description}" for x in dead)
    cli = subprocess.run([sys.executable, "-m", "worker.cli", "dlq", "list", "--json"],
                         cwd=d.root, env=d.env, capture_output=True, text=True, check=True)
    plan = subprocess.run([sys.executable, "-m", "worker.cli", "plan", "-"], cwd=d.root,
                          env=d.env, input=json.dumps(bad[0]), capture_output=True, text=True)
    assert plan.returncode != 0
    outputs = {"logs": logs, "metrics": metrics, "dead letters": descriptions,
               "dlq list": cli.stdout + cli.stderr, "plan": plan.stdout + plan.stderr}
    # the error paths really ran and were logged
    assert "AuthenticationFailed" in logs and "message.dead_lettered" in logs
    assert peer.outcomes["throttled"] and peer.outcomes["unavailable"]
    for where, text in outputs.items():
        for value in values:
            assert value not in text, f"a secret leaked into the {where}"
        for pattern in LEAKS:
            assert not pattern.search(text), (where, pattern.search(text))


def test_invalid_settings_never_echo_secret_values(daemon: Callable[..., Daemon]) -> None:
    """A config whose secret settings are malformed fails to start, naming the keys but
    not their values."""
    key = secret_b64()
    d = daemon({"batch": {"account_url": "https://acct.westeurope.batch.azure.com",
                          "account_key": [key]},
                "servicebus": {"connection_string": {"value": key}},
                "consumer": {"concurrency": "many"}})
    d.start()
    assert d.wait(30) != 0
    text = d.log_text()
    assert "batch.account_key" in text and "servicebus.connection_string" in text
    assert "consumer.concurrency = 'many'" in text  # values of other keys are shown
    assert key not in text
