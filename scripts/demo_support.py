#!/usr/bin/env python3
"""Helpers for scripts/demo: fake ECS metadata + a toy application, and a Cloud Map inspector.

Subcommands:
  serve     --task FILE --self-container NAME
            Serve a fake ECS task metadata endpoint v4 and a toy application, each on a free
            loopback port. Prints "METADATA_PORT APP_PORT" on the first stdout line once both
            listen, then runs until stdin closes (like tests/support/moto_server.py), so the
            servers never outlive the demo that started them. Standard library only.
  exec-tied --parent PID -- COMMAND...
            Exec COMMAND so that it gets SIGTERM when PID (the demo script) dies, even by SIGKILL
            (Linux prctl PR_SET_PDEATHSIG): for the sidecar, which has no stdin to watch.
  set-health --app-port PORT healthy|unhealthy
            Flip the toy application's /health answer.
  setup     --endpoint URL --namespace NAME --service NAME
            Create an HTTP namespace and a service with custom health; print the service ID.
  show      --endpoint URL --service-id ID
            Print the service's instances, their attributes and health.
  wait      --endpoint URL --service-id ID --instance ID (--health STATUS | --gone)
            [--attr K=V ...] [--timeout SECONDS]
            Poll until the instance has that health (and those attributes) or is gone, then show
            the instances. Exit 1, with the reason, on timeout.

The Cloud Map subcommands need boto3 (the venv from scripts/setup-venv has it).
"""

import argparse
import json
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

REGION = "us-east-1"

# ---------------------------------------------------------------------------------------------
# serve: fake metadata endpoint + toy application (standard library only)
# ---------------------------------------------------------------------------------------------


class QuietHandler(BaseHTTPRequestHandler):
    """No per-request access log: the sidecar probes every second and would drown the demo."""

    def log_message(self, format, *args):
        pass

    def reply(self, status, body, content_type="application/json"):
        data = body.encode() if isinstance(body, str) else body
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def metadata_handler(task, container):
    """ECS task metadata endpoint v4 under /v4/demo, as ECS_CONTAINER_METADATA_URI_V4 points at it."""
    task_body = json.dumps(task, indent=2)
    container_body = json.dumps(container, indent=2)

    class Handler(QuietHandler):
        def do_GET(self):
            path = self.path.split("?", 1)[0].rstrip("/")
            if path == "/v4/demo":
                self.reply(200, container_body)
            elif path == "/v4/demo/task":
                self.reply(200, task_body)
            else:
                # Same shape of answer as the agent's for an unknown path.
                self.reply(404, json.dumps({"error": f"no metadata at {path}"}))

    return Handler


def app_handler(state):
    """The toy application: /health answers 200 or 503; /healthy and /unhealthy flip it."""

    class Handler(QuietHandler):
        def do_GET(self):
            path = self.path.split("?", 1)[0]
            if path == "/health":
                if state["healthy"]:
                    self.reply(200, "ok\n", "text/plain")
                else:
                    self.reply(503, "unhealthy\n", "text/plain")
            elif path in ("/healthy", "/unhealthy"):
                state["healthy"] = path == "/healthy"
                self.reply(200, f"now {path[1:]}\n", "text/plain")
            else:
                self.reply(404, "not found\n", "text/plain")

        do_POST = do_GET

    return Handler


def start(server):
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server.server_address[1]


def cmd_serve(args):
    with open(args.task) as f:
        task = json.load(f)
    # The container endpoint answers with this container's entry of the task, as ECS does.
    matches = [
        c for c in task.get("Containers", []) if c.get("Name") == args.self_container
    ]
    if not matches:
        sys.exit(
            f"demo_support: no container named {args.self_container!r} in {args.task}"
        )
    meta = ThreadingHTTPServer(("127.0.0.1", 0), metadata_handler(task, matches[0]))
    app = ThreadingHTTPServer(("127.0.0.1", 0), app_handler({"healthy": True}))
    print(start(meta), start(app), flush=True)
    try:
        sys.stdin.read()  # EOF: whoever started us is gone.
    finally:
        meta.shutdown()
        app.shutdown()


def cmd_exec_tied(args):
    import ctypes
    import os
    import signal

    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0) != 0:
        sys.exit(f"demo_support: prctl: {os.strerror(ctypes.get_errno())}")
    # The parent may have died before prctl took effect: then nobody would send the signal.
    if os.getppid() != args.parent:
        sys.exit("demo_support: the demo is gone; not starting")
    command = args.command_line[1:] if args.command_line[:1] == ["--"] else args.command_line
    os.execvp(command[0], command)  # the death signal setting survives exec


def cmd_set_health(args):
    url = f"http://127.0.0.1:{args.app_port}/{args.state}"
    with urllib.request.urlopen(
        urllib.request.Request(url, method="POST"), timeout=5
    ) as r:
        r.read()


# ---------------------------------------------------------------------------------------------
# Cloud Map (boto3 against the moto server)
# ---------------------------------------------------------------------------------------------


def client(endpoint):
    import boto3  # Only these subcommands need it: `serve` stays standard library only.

    return boto3.client(
        "servicediscovery",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id="demo",
        aws_secret_access_key="demo",
    )


def cmd_setup(args):
    sd = client(args.endpoint)
    sd.create_http_namespace(Name=args.namespace)
    # CreateHttpNamespace is asynchronous and returns an operation, not the ID: look it up by name
    # (checking the name ourselves: moto ignores ListNamespaces filters).
    ns_id = next(
        ns["Id"]
        for page in sd.get_paginator("list_namespaces").paginate()
        for ns in page["Namespaces"]
        if ns["Name"] == args.namespace
    )
    # Custom health: the only kind an HTTP namespace can have, and what the sidecar reports to.
    # FailureThreshold is deprecated (always 1) but still accepted.
    service = sd.create_service(
        Name=args.service,
        NamespaceId=ns_id,
        HealthCheckCustomConfig={"FailureThreshold": 1},
    )["Service"]
    print(service["Id"])


def instances(sd, service_id):
    """[(instance ID, attributes, health)] for every instance of the service."""
    found = [
        inst
        for page in sd.get_paginator("list_instances").paginate(ServiceId=service_id)
        for inst in page["Instances"]
    ]
    health = {}
    if found:
        kwargs = {"ServiceId": service_id}
        while True:
            page = sd.get_instances_health_status(**kwargs)
            health.update(page.get("Status", {}))
            if not page.get("NextToken"):
                break
            kwargs["NextToken"] = page["NextToken"]
    return [(i["Id"], i.get("Attributes", {}), health.get(i["Id"], "-")) for i in found]


def render(service_id, rows):
    if not rows:
        return f"    (service {service_id} has no instances)"
    lines = []
    width = max(len("INSTANCE"), *(len(r[0]) for r in rows))
    lines.append(f"    {'INSTANCE':<{width}}  HEALTH     ATTRIBUTES")
    for inst_id, attrs, health in rows:
        pairs = [f"{k}={v}" for k, v in sorted(attrs.items())] or ["-"]
        lines.append(f"    {inst_id:<{width}}  {health:<9}  {pairs[0]}")
        lines.extend(f"    {'':<{width}}  {'':<9}  {p}" for p in pairs[1:])
    return "\n".join(lines)


def cmd_show(args):
    print(render(args.service_id, instances(client(args.endpoint), args.service_id)))


def unmet(rows, args):
    """Why the state is not yet the one waited for ("" when it is)."""
    mine = [r for r in rows if r[0] == args.instance]
    if args.gone:
        return f"instance {args.instance} is still registered" if mine else ""
    if not mine:
        return f"instance {args.instance} is not registered"
    if len(mine) > 1:
        return f"instance {args.instance} is listed {len(mine)} times"
    _, attrs, health = mine[0]
    if health != args.health:
        return f"instance {args.instance} is {health}, not {args.health}"
    for want in args.attr:
        key, _, value = want.partition("=")
        if attrs.get(key) != value:
            return f"attribute {key} is {attrs.get(key)!r}, expected {value!r}"
    return ""


def cmd_wait(args):
    sd = client(args.endpoint)
    deadline = time.monotonic() + args.timeout
    while True:
        rows = instances(sd, args.service_id)
        why = unmet(rows, args)
        if not why or time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    print(render(args.service_id, rows))
    if why:
        sys.exit(f"demo: FAILED after {args.timeout:g}s: {why}")


def main():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve")
    s.add_argument("--task", required=True)
    s.add_argument("--self-container", required=True)
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("exec-tied")
    s.add_argument("--parent", required=True, type=int)
    s.add_argument("command_line", nargs=argparse.REMAINDER)
    s.set_defaults(func=cmd_exec_tied)

    s = sub.add_parser("set-health")
    s.add_argument("--app-port", required=True, type=int)
    s.add_argument("state", choices=["healthy", "unhealthy"])
    s.set_defaults(func=cmd_set_health)

    s = sub.add_parser("setup")
    s.add_argument("--endpoint", required=True)
    s.add_argument("--namespace", required=True)
    s.add_argument("--service", required=True)
    s.set_defaults(func=cmd_setup)

    for name, func in (("show", cmd_show), ("wait", cmd_wait)):
        s = sub.add_parser(name)
        s.add_argument("--endpoint", required=True)
        s.add_argument("--service-id", required=True)
        s.set_defaults(func=func)
    s.add_argument("--instance", required=True)
    which = s.add_mutually_exclusive_group(required=True)
    which.add_argument("--health", choices=["HEALTHY", "UNHEALTHY"])
    which.add_argument("--gone", action="store_true")
    s.add_argument("--attr", action="append", default=[], metavar="K=V")
    s.add_argument("--timeout", type=float, default=30)

    args = p.parse_args()
    try:
        args.func(args)
    except Exception as e:
        # One readable line for failures to reach a server, not a traceback; real bugs still raise.
        if type(e).__module__.split(".")[0] not in ("botocore", "urllib", "http"):
            raise
        sys.exit(f"demo_support {args.command}: {e}")


if __name__ == "__main__":
    main()
