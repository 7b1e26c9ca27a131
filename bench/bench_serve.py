"""The policy server against in-process ``predict_action``: latency (p50 / p99) and actions per second at 1, 4 and
16 concurrent clients, in one run on one machine.

python bench/bench_serve.py [--base builtin:tiny-vla-maniskill] [--adapter builtin:tiny-vla-maniskill-color]
                            [--clients 1 4 16] [--requests 48] [--rounds 20] [--threads 1] [--max-wait-ms 0]

A real server process (``python -m rvla_peft.serve``, the LoRA merged, batches of up to the most clients) on
127.0.0.1; each client a thread with its own kept-alive connection sending 64x64 camera images one request at a time,
as a robot does. In process: the same policy, merged, one ``predict_action`` at a time. On a shared machine the load
drifts within seconds, so the two are compared call for call: an in-process call, then the same image through the
server, in turn; the throughput at 1, 4 and 16 clients in many short rounds, each number of clients once per round
(actions per second: all requests over all their rounds' seconds). Printed: p50 / p99 latency, actions per second,
the mean batch the server formed, the p50 of the forward itself (the server's ``server_timing.infer_ms``; in
process, the call), and the two ratios the server is held to: p50 through the server at 1 client over in-process
p50 (target <= 1.15), and actions per second at the most clients over 1 client (target >= 3).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rvla_peft.serving.client import PolicyClient  # noqa: E402

INSTRUCTION = "push the cube to the goal region"


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def start_server(args, logs: Path) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "rvla_peft.serve", "--base", args.base, "--port", "0"]
    command += ["--max-batch", str(max(args.clients)), "--max-wait-ms", str(args.max_wait_ms)]
    if args.adapter:
        command += ["--adapter", args.adapter]
    out = open(logs / "out.txt", "w")
    process = subprocess.Popen(command, stdout=out, stderr=open(logs / "err.txt", "w"), env=env, cwd=ROOT)
    deadline = time.monotonic() + 300
    while "http://" not in (text := (logs / "out.txt").read_text()):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            sys.exit(f"the server did not start:\n{(logs / 'err.txt').read_text()[-3000:]}")
        time.sleep(0.2)
    return process, "http://" + text.split("http://", 1)[1].split()[0]


def paired_latencies(policy, url: str, images: list[np.ndarray], requests: int) -> tuple[list, list, list]:
    """In process and through the server (one client), call for call in turn, so that both see the same load:
    the latencies of each and the server's forward times."""
    local, served, forward = [], [], []
    with PolicyClient(url) as client:
        for i in range(requests):
            image = images[i % len(images)]
            t = time.perf_counter()
            policy.predict_action(image, INSTRUCTION)
            local.append(1000 * (time.perf_counter() - t))
            t = time.perf_counter()
            reply = client.act_reply(image, INSTRUCTION)
            served.append(1000 * (time.perf_counter() - t))
            forward.append(reply["server_timing"]["infer_ms"])
    return local, served, forward


def server_round(url: str, clients: int, images: list[np.ndarray], requests: int) -> dict:
    """``requests`` requests in all, shared by ``clients`` threads that start together."""
    per_client = max(1, requests // clients)
    latencies: list[list[float]] = [[] for _ in range(clients)]
    batches: list[list[int]] = [[] for _ in range(clients)]
    infer: list[list[float]] = [[] for _ in range(clients)]
    connections = [PolicyClient(url) for _ in range(clients)]
    for c in connections:
        c.health()  # connected before the clock starts
    barrier = threading.Barrier(clients + 1)

    def run(k: int) -> None:
        barrier.wait()
        for i in range(per_client):
            t = time.perf_counter()
            reply = connections[k].act_reply(images[(k + i) % len(images)], INSTRUCTION)
            latencies[k].append(1000 * (time.perf_counter() - t))
            batches[k].append(reply["server_timing"]["batch_size"])
            infer[k].append(reply["server_timing"]["infer_ms"])

    threads = [threading.Thread(target=run, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    for c in connections:
        c.close()
    return {
        "latencies": sum(latencies, []),
        "seconds": seconds,
        "batches": sum(batches, []),
        "infer": sum(infer, []),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="builtin:tiny-vla-maniskill")
    parser.add_argument("--adapter", default="builtin:tiny-vla-maniskill-color")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=48, help="requests per number of clients and round")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="torch threads, in process and in the server")
    parser.add_argument("--max-wait-ms", type=float, default=0.0, help="the server's --max-wait-ms")
    args = parser.parse_args()

    import torch

    from rvla_peft.policies.registry import load_policy

    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(16)]
    policy = load_policy(args.base, args.adapter or None).eval()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"base={args.base} adapter={args.adapter} cpus={os.cpu_count()} torch_threads={args.threads} "
        f"max_wait_ms={args.max_wait_ms} requests={args.requests} rounds={args.rounds} load={load:.1f} "
        f"device={'cuda' if torch.cuda.is_available() else 'cpu'} torch={torch.__version__}"
    )
    with tempfile.TemporaryDirectory() as logs, policy.acting():
        process, url = start_server(args, Path(logs))
        try:
            for _ in range(2):  # warm-up: first forwards and connections, both sides
                paired_latencies(policy, url, images, 8)
                server_round(url, max(args.clients), images, 2 * max(args.clients))
            local, served, forward = paired_latencies(policy, url, images, args.requests * args.rounds)
            rounds = {c: [] for c in args.clients}
            for _ in range(args.rounds):
                for c in args.clients:
                    rounds[c].append(server_round(url, c, images, args.requests))
        finally:
            process.terminate()
            process.wait(timeout=30)

    def row(label: str, latencies: list[float], per_s: float, batch: float, infer: list[float]) -> None:
        print(
            f"  {label:<12} p50 {percentile(latencies, 50):7.1f} ms   p99 {percentile(latencies, 99):7.1f} ms   "
            f"{per_s:7.1f} actions/s   mean batch {batch:5.2f}   forward p50 {percentile(infer, 50):6.1f} ms"
        )

    print(f"latency, in process and through the server call for call ({len(local)} calls each):")
    row("in-process", local, 1000 / statistics.mean(local), 1.0, local)
    row("server x1", served, 1000 / statistics.mean(served), 1.0, forward)
    print(f"throughput, {args.rounds} rounds of {args.requests} requests per number of clients, pooled:")
    pooled = {}
    for c, runs in rounds.items():
        latencies = [x for r in runs for x in r["latencies"]]
        pooled[c] = len(latencies) / sum(r["seconds"] for r in runs)
        batches = [b for r in runs for b in r["batches"]]
        row(f"server x{c}", latencies, pooled[c], statistics.mean(batches), [x for r in runs for x in r["infer"]])
    p50_ratio = percentile(served, 50) / percentile(local, 50)
    first, last = args.clients[0], args.clients[-1]
    print(f"p50 through the server at 1 client / in-process p50: {p50_ratio:.2f} (target <= 1.15)")
    print(f"actions/s at {last} clients / at {first}: {pooled[last] / pooled[first]:.2f} (target >= 3)")


if __name__ == "__main__":
    main()
