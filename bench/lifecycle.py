"""Lifecycle benchmark: the sidecar against the floor program, interleaved, in one run.

Usage (through scripts/bench, which builds both release binaries first):
    python bench/lifecycle.py --project target/release/cloudmap-sidecar \
        --floor target/release/examples/floor [--trials 5] [--idle 60]

Everything runs on loopback: the moto server (Cloud Map), a counting proxy in front of it (Cloud
Map calls are counted per operation there), a fake ECS task metadata endpoint serving a real
published Fargate body, and a tiny application with a health endpoint. Per program it reports:
start -> instance listed, SIGTERM -> instance gone, SIGTERM -> exit, resident memory after 2 s
idle, binary size, CPU time over the idle window, and Cloud Map calls per hour of steady running
(extrapolated from the idle window). Then the project/floor ratio of each.
"""

import argparse
import http.client
import http.server
import json
import os
import platform
import signal
import socket
import socketserver
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import boto3

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASK_FIXTURE = os.path.join(ROOT, "tests/data/ecs-v4/docs-2020-fargate-pv14-task.json")
SELF_CONTAINER = b'{"DockerId":"bench-sidecar","Name":"cloudmap-sidecar","Type":"NORMAL","KnownStatus":"RUNNING"}'
TICKS = os.sysconf("SC_CLK_TCK")


class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True


def serve(handler_cls):
    server = Server(("127.0.0.1", 0), handler_cls)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, server.server_address[1]


class Quiet(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes: without TCP_NODELAY, Nagle's algorithm holds the
    # body until the client's delayed ACK (~40 ms), which would be measured as the program's time.
    disable_nagle_algorithm = True

    def log_message(self, *args):
        pass

    def reply(self, status, body, ctype="application/json"):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def metadata_handler(task_body):
    class Metadata(Quiet):
        def do_GET(self):
            if self.path == "/v4/bench/task":
                self.reply(200, task_body)
            elif self.path == "/v4/bench":
                self.reply(200, SELF_CONTAINER)
            else:
                self.reply(404, b'"not found"')

    return Metadata


class App(Quiet):
    def do_GET(self):
        self.reply(200, b"ok", "text/plain")


def proxy_handler(moto_port, counts, lock):
    class Proxy(Quiet):
        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            op = (self.headers.get("X-Amz-Target") or "?").split(".")[-1]
            with lock:
                counts[op] = counts.get(op, 0) + 1
            conn = http.client.HTTPConnection("127.0.0.1", moto_port, timeout=30)
            conn.connect()
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # see Quiet
            headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
            conn.request("POST", self.path, body, headers)
            resp = conn.getresponse()
            data = resp.read()
            self.send_response(resp.status)
            for k, v in resp.getheaders():
                if k.lower() not in ("content-length", "connection", "transfer-encoding", "server", "date"):
                    self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    return Proxy


def start_moto():
    proc = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "tests/support/moto_server.py")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )
    port = int(proc.stdout.readline())
    return proc, port


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def wait_for(check, timeout, step=0.002):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if check():
            return time.monotonic()
        time.sleep(step)
    raise TimeoutError("condition not met")


def trial(name, argv, env, client, service_id, instance_id, counts, lock, idle):
    """One lifecycle of one program; returns its measurements."""
    listed = lambda: any(i["Id"] == instance_id for i in client.list_instances(ServiceId=service_id)["Instances"])
    # The program's log goes to a file: an unread pipe could fill up and block it.
    log = tempfile.NamedTemporaryFile(prefix=f"bench-{name}-", suffix=".log", delete=False)
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=log)
    try:
        t_listed = wait_for(listed, 30)
        time.sleep(2.0)
        rss = rss_kib(proc.pid)
        with lock:
            before = dict(counts)
        cpu0 = cpu_seconds(proc.pid)
        time.sleep(idle)
        cpu1 = cpu_seconds(proc.pid)
        with lock:
            calls = sum(counts.values()) - sum(before.values())
        t_term = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        t_gone = wait_for(lambda: not listed(), 30)
        proc.wait(30)
        t_exit = time.monotonic()
    except Exception:
        print(f"{name} log ({log.name}):\n" + open(log.name).read()[-3000:], file=sys.stderr)
        raise
    finally:
        if proc.poll() is None:
            proc.kill()
    if proc.returncode != 0:
        raise RuntimeError(f"{name} exited {proc.returncode}: {open(log.name).read()[-2000:]}")
    if not os.environ.get("BENCH_KEEP_LOGS"):
        os.unlink(log.name)
    return {
        "start_to_registered_ms": (t_listed - t0) * 1000,
        "sigterm_to_deregistered_ms": (t_gone - t_term) * 1000,
        "sigterm_to_exit_ms": (t_exit - t_term) * 1000,
        "rss_mib": rss / 1024,
        "cpu_percent_idle": (cpu1 - cpu0) / idle * 100,
        "calls_per_hour": calls * 3600 / idle,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--project", required=True)
    ap.add_argument("--floor", required=True)
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--idle", type=float, default=60.0, help="seconds of steady running measured per trial")
    ap.add_argument("--json", help="also write the raw results here")
    args = ap.parse_args()

    moto, moto_port = start_moto()
    counts, lock = {}, threading.Lock()
    _, proxy_port = serve(proxy_handler(moto_port, counts, lock))
    with open(TASK_FIXTURE, "rb") as f:
        task_body = f.read()
    task = json.loads(task_body)
    instance_id = task["TaskARN"].rsplit("/", 1)[1]
    _, meta_port = serve(metadata_handler(task_body))
    _, app_port = serve(App)

    client = boto3.client("servicediscovery", endpoint_url=f"http://127.0.0.1:{moto_port}", region_name="us-east-1",
                          aws_access_key_id="bench", aws_secret_access_key="bench")
    client.create_http_namespace(Name="bench.local")
    ns = next(n["Id"] for n in client.list_namespaces()["Namespaces"] if n["Name"] == "bench.local")
    service_id = client.create_service(Name="ap", NamespaceId=ns, HealthCheckCustomConfig={})["Service"]["Id"]

    env = {
        "PATH": os.environ.get("PATH", ""),
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy_port}",
        "AWS_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_EC2_METADATA_DISABLED": "true",
        "ECS_CONTAINER_METADATA_URI_V4": f"http://127.0.0.1:{meta_port}/v4/bench",
        "CLOUDMAP_SERVICE_ID": service_id,
    }
    programs = {
        "project": [args.project, "run", "--port", "8080", "--drain", "0", "--start-jitter", "0",
                    "--health-url", f"http://127.0.0.1:{app_port}/health", "--health-interval", "5s"] + os.environ.get("BENCH_PROJECT_ARGS", "").split(),
        "floor": [args.floor],
    }
    results = {name: [] for name in programs}
    try:
        for i in range(args.trials):
            order = list(programs) if i % 2 == 0 else list(reversed(programs))
            for name in order:
                r = trial(name, programs[name], env, client, service_id, instance_id, counts, lock, args.idle)
                results[name].append(r)
                print(f"trial {i + 1} {name:8} " + " ".join(f"{k}={v:.1f}" for k, v in r.items()), file=sys.stderr)
    finally:
        moto.stdin.close()
        moto.wait(10)

    sizes = {name: os.path.getsize(argv[0]) / (1024 * 1024) for name, argv in programs.items()}
    metrics = [
        ("start_to_registered_ms", "start → registered (ms, median)"),
        ("sigterm_to_deregistered_ms", "SIGTERM → deregistered (ms, median)"),
        ("sigterm_to_exit_ms", "SIGTERM → exit (ms, median)"),
        ("rss_mib", "resident memory after 2 s idle (MiB, median)"),
        ("binary_mib", "binary size (MiB)"),
        ("cpu_percent_idle", f"CPU over {args.idle:g} s idle (% of a core, median)"),
        ("calls_per_hour", "Cloud Map calls per hour, steady (median)"),
    ]
    med = lambda name, key: sizes[name] if key == "binary_mib" else statistics.median(r[key] for r in results[name])
    print(f"\n{time.strftime('%Y-%m-%d')} · {platform.machine()} · {os.cpu_count()} cores · "
          f"{args.trials} interleaved trials · idle window {args.idle:g} s\n")
    print("| metric | project | floor | project/floor |")
    print("| --- | ---: | ---: | ---: |")
    for key, label in metrics:
        p, f = med("project", key), med("floor", key)
        ratio = f"{p / f:.2f}×" if f > 0 else ("—" if p == 0 else "∞")
        print(f"| {label} | {p:.2f} | {f:.2f} | {ratio} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": results, "sizes_mib": sizes}, f, indent=2)


if __name__ == "__main__":
    main()
