"""Drives Flotilla's MCP server with the official MCP Python SDK (PyPI `mcp`).

Used by server/tests/it/mcp.rs for the streamable HTTP and legacy SSE transports:

    python mcp_client.py --transport http|sse --url URL --token TOKEN < plan.json

The plan (stdin) is a JSON list of tool calls: {"tool": name, "args": {...}, "confirm": bool}.
With "confirm", the first answer must be status=confirmation_required and the call is
repeated with its confirmation_token (the two-step flow a client without elicitation uses).
An argument value "$N.key" is replaced by `key` of call N's structured result (e.g.
"$6.command_id": the command queued by call 6), so a plan can follow up on what it queued.
Prints one JSON object on stdout: the tools, prompts and resources seen, and every call's
answers (wire JSON, camelCase). If the session itself fails (e.g. a refused token), prints
{"session_error": message, "session_error_type": name} instead and exits with status 3: the
message is what the SDK tells its user. The SDK's own log (stderr) is left for the caller to
inspect, e.g. for "Session termination failed".
"""

import argparse
import asyncio
import json
import sys

import httpx2
from mcp.client.session import ClientSession
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client


def dump(model):
    return model.model_dump(by_alias=True, mode="json", exclude_none=True)


def resolve(value, calls):
    """An argument, with "$N.key" replaced by `key` of call N's structured result."""
    if isinstance(value, str) and value.startswith("$"):
        index, key = value[1:].split(".", 1)
        structured = calls[int(index)]["result"].get("structuredContent") or {}
        if key not in structured:
            raise SystemExit(f"plan refers to {value}, but call {index} gave {structured}")
        return structured[key]
    return value


async def run(session, plan):
    out = {}
    init = await session.initialize()
    out["server"] = dump(init)
    tools = await session.list_tools()
    out["tools"] = [dump(t) for t in tools.tools]
    prompts = await session.list_prompts()
    out["prompts"] = [p.name for p in prompts.prompts]
    if out["prompts"]:
        got = await session.get_prompt(out["prompts"][0], {})
        out["prompt_text"] = dump(got)["messages"][0]["content"]["text"]
    resources = await session.list_resources()
    out["resources"] = [r.uri for r in resources.resources]
    templates = await session.list_resource_templates()
    out["resource_templates"] = [t.uri_template for t in templates.resource_templates]
    summary = await session.read_resource("flotilla://fleet/summary")
    out["summary_resource"] = json.loads(dump(summary)["contents"][0]["text"])
    calls = []
    for step in plan:
        entry = {"tool": step["tool"]}
        step_args = {k: resolve(v, calls) for k, v in step.get("args", {}).items()}
        try:
            result = dump(await session.call_tool(step["tool"], step_args))
        except Exception as e:  # protocol errors (unknown tool, read-only refusal)
            entry["protocol_error"] = str(e)
            calls.append(entry)
            continue
        if step.get("confirm"):
            entry["first"] = result
            token = (result.get("structuredContent") or {}).get("confirmation_token")
            if token:
                args = dict(step_args)
                args["confirmation_token"] = token
                result = dump(await session.call_tool(step["tool"], args))
        entry["result"] = result
        calls.append(entry)
    out["calls"] = calls
    return out


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--transport", choices=["http", "sse"], required=True)
    ap.add_argument("--url", required=True)
    ap.add_argument("--token", required=True)
    a = ap.parse_args()
    plan = json.load(sys.stdin)
    headers = {"Authorization": f"Bearer {a.token}"}
    if a.transport == "sse":
        async with sse_client(a.url, headers=headers, timeout=30) as (read, write):
            async with ClientSession(read, write) as session:
                out = await run(session, plan)
    else:
        async with httpx2.AsyncClient(headers=headers, timeout=30) as http:
            async with streamable_http_client(a.url, http_client=http) as streams:
                read, write = streams[0], streams[1]
                async with ClientSession(read, write) as session:
                    out = await run(session, plan)
    print(json.dumps(out))


def leaf(exc):
    """The first real error inside the task-group wrappers anyio raises."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except Exception as e:  # noqa: BLE001 - reported to the test, which asserts on it
        err = leaf(e)
        print(json.dumps({"session_error": str(err), "session_error_type": type(err).__name__}))
        sys.exit(3)
