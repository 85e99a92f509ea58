# Interop peer: drives opentelemetry-opamp-client 0.5b0 against a Flotilla server and prints one JSON event per line.
"""Python OpAMP peer for the flotilla-e2e tests.

Usage: peer.py --endpoint URL [--heartbeat SECONDS] [--name NAME] [--run-seconds N]

stdout carries one JSON object per line:
  {"event":"started","instance_uid":"<32 hex>","uuid":"<canonical>","capabilities":N}
  {"event":"connected"}                      first successful exchange
  {"event":"remote_config","hash":"<hex>","files":{name: body}}  then APPLIED is reported
  {"event":"remote_config_applied","hash":"<hex>"}
  {"event":"full_state_requested"}           server set ServerToAgentFlags.ReportFullState
  {"event":"server_error","type":N,"message":"..."}   ServerToAgent.error_response
  {"event":"connect_failed","error":"..."}
  {"event":"stopped"}
Library logs go to stderr (level from PEER_LOG, default WARNING).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
import uuid

from opentelemetry._opamp.agent import OpAMPAgent
from opentelemetry._opamp.callbacks import OpAMPCallbacks
from opentelemetry._opamp.client import _DEFAULT_CAPABILITIES, OpAMPClient
from opentelemetry._opamp.proto import opamp_pb2

_out_lock = threading.Lock()


def emit(event: str, **fields) -> None:
    line = json.dumps({"event": event, **fields}, sort_keys=True)
    with _out_lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


REPORTS_HEALTH = opamp_pb2.AgentCapabilities.AgentCapabilities_ReportsHealth
CAPABILITIES = _DEFAULT_CAPABILITIES | REPORTS_HEALTH  # 0x3807


class HealthReportingClient(OpAMPClient):
    """OpAMPClient that adds ReportsHealth: every full-state report carries a healthy ComponentHealth.

    The library has no health API, so the full-state message is extended here. `send` is wrapped
    only to observe ServerToAgent flags (the library handles ReportFullState internally and does
    not expose it to callbacks)."""

    def __init__(self, **kwargs):
        super().__init__(capabilities=CAPABILITIES, **kwargs)
        self._start_time_ns = time.time_ns()

    def build_full_state_message(self) -> bytes:
        message = opamp_pb2.AgentToServer()
        message.ParseFromString(super().build_full_state_message())
        message.health.CopyFrom(
            opamp_pb2.ComponentHealth(
                healthy=True,
                start_time_unix_nano=self._start_time_ns,
                status="running",
                status_time_unix_nano=time.time_ns(),
            )
        )
        return message.SerializeToString()

    def send(self, data: bytes):
        response = super().send(data)
        if response is not None and response.flags & opamp_pb2.ServerToAgentFlags_ReportFullState:
            emit("full_state_requested")
        return response


class PeerCallbacks(OpAMPCallbacks):
    def __init__(self) -> None:
        self._connected = False

    def on_connect(self, agent, client) -> None:
        if not self._connected:
            self._connected = True
            emit("connected")

    def on_connect_failed(self, agent, client, error) -> None:
        emit("connect_failed", error=str(error))

    def on_error(self, agent, client, error_response) -> None:
        emit("server_error", type=int(error_response.type), message=error_response.error_message)

    def on_message(self, agent, client, message) -> None:
        remote = message.remote_config
        if remote is None:
            return
        config_hash = bytes(remote.config_hash)
        files = {
            name: bytes(f.body).decode("utf-8", errors="replace")
            for name, f in remote.config.config_map.items()
        }
        emit("remote_config", hash=config_hash.hex(), files=files)
        content_types = {f.content_type for f in remote.config.config_map.values()}
        content_type = content_types.pop() if len(content_types) == 1 else ""
        # Effective config = what was applied; the library sends it with the next full-state
        # report. For application/json it json.dumps() each value, so hand it parsed JSON
        # (a body string would arrive double-encoded).
        effective = dict(files)
        if content_type == "application/json":
            for name, body in files.items():
                try:
                    effective[name] = json.loads(body)
                except ValueError:
                    pass
        client.update_effective_config(effective, content_type)
        status = client.update_remote_config_status(
            remote_config_hash=config_hash,
            status=opamp_pb2.RemoteConfigStatuses_APPLIED,
        )
        if status is not None:
            agent.send(client.build_remote_config_status_response_message(status))
            emit("remote_config_applied", hash=config_hash.hex())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--heartbeat", type=float, default=1.0)
    parser.add_argument("--name", default="py-peer")
    parser.add_argument("--run-seconds", type=float, default=3600.0)
    args = parser.parse_args()

    logging.basicConfig(stream=sys.stderr, level=os.environ.get("PEER_LOG", "WARNING").upper())

    client = HealthReportingClient(
        endpoint=args.endpoint,
        agent_identifying_attributes={"service.name": args.name},
        agent_non_identifying_attributes={"host.name": args.name},
    )
    agent = OpAMPAgent(interval=args.heartbeat, callbacks=PeerCallbacks(), client=client)

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())

    uid = bytes(client._instance_uid)  # no public accessor in 0.5b0
    emit("started", instance_uid=uid.hex(), uuid=str(uuid.UUID(bytes=uid)), capabilities=CAPABILITIES)
    agent.start()
    stop.wait(args.run_seconds)
    # stop() sends AgentDisconnect; the library's atexit hook sends a second one at exit.
    agent.stop(timeout=5)
    emit("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
