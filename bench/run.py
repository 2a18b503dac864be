"""kubemta against Postfix on one machine: ``python3 -m bench.run``.

Each system relays to its own smtp-sink on loopback.  For every message
size and session count, in rounds that alternate the order of the systems,
``smtp-source`` sends a batch and the run is timed twice: until the last
250 (accepted per second) and until the sink has every message and the
queue is empty (delivered end to end per second).  A small client of our
own then measures per-transaction latency (p50/p99) at 100 sessions.  CPU
seconds per message and peak memory cover all of a system's processes
(memory as PSS, so pages Postfix's daemons share are counted once).

Results: ``bench/results/results.json``, ``results.md`` and
``throughput.png``, with medians and min-max of the ratios kubemta ÷
Postfix and kubemta-with-DKIM ÷ Postfix+OpenDKIM.  ``--smoke`` runs one
small round, to show that it works and that every accepted message is
delivered.  Nothing is installed here; missing tools are named and the run
stops (exit 2).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from bench.systems import (
    DOMAIN,
    HOST,
    Kubemta,
    OpenDkim,
    Postfix,
    Redis,
    Sink,
    System,
    cpu_seconds,
    pss_bytes,
    wait_until,
)

NEEDED = {"smtp-source": "postfix", "smtp-sink": "postfix", "postfix": "postfix", "postqueue": "postfix",
          "opendkim": "opendkim"}
OUT = Path(__file__).parent / "results"


def check_tools(shared_limits: bool) -> None:
    needed = {**NEEDED, "redis-server": "redis-server"} if shared_limits else NEEDED
    missing = [f"{tool} (Debian package {package})" for tool, package in needed.items()
               if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists()]
    if missing:
        print("bench: missing: " + ", ".join(missing), file=sys.stderr)
        sys.exit(2)


def make_key(workdir: Path) -> Path:
    from mta.dkim import keys

    path = workdir / "bench.pem"
    if not path.exists():
        keys.write_private_key(keys.generate("rsa", 2048), path)
    # OpenDKIM wants PKCS#1; kubemta reads either.
    from cryptography.hazmat.primitives import serialization

    key = keys.load_private_key(path)
    pkcs1 = workdir / "bench-pkcs1.pem"
    pkcs1.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                        serialization.NoEncryption()))
    return pkcs1


class Sampler(threading.Thread):
    """Peak summed PSS of a system's processes while a run goes on."""

    def __init__(self, system: System, extra: list[Any]) -> None:
        super().__init__(daemon=True)
        self.system, self.extra = system, extra
        self.peak = 0
        self.done = threading.Event()

    def pids(self) -> list[int]:
        return self.system.pids() + [p for e in self.extra for p in e.pids()]

    def run(self) -> None:
        while not self.done.is_set():
            self.peak = max(self.peak, pss_bytes(self.pids()))
            self.done.wait(0.1)


def one_run(system: System, extra: list[Any], count: int, size: int, sessions: int) -> dict[str, Any]:
    sampler = Sampler(system, extra)
    before_cpu = cpu_seconds(sampler.pids())
    before_count = system.sink.count()
    sampler.start()
    start = time.monotonic()
    done = subprocess.run(["smtp-source", "-s", str(sessions), "-m", str(count), "-l", str(size),
                           "-f", f"bench@{DOMAIN}", "-t", "someone@example.net", "-M", "bench-client.bench.test",
                           f"{HOST}:{system.port}"], capture_output=True, text=True, timeout=1800)
    accepted_at = time.monotonic()
    delivered = wait_until(lambda: system.sink.count() - before_count >= count, timeout=1800)
    wait_until(system.queue_empty, timeout=60, step=0.2)
    delivered_at = time.monotonic()
    sampler.done.set()
    sampler.join()
    after_cpu = cpu_seconds(sampler.pids())
    got = system.sink.count() - before_count
    return {
        "system": system.name, "size": size, "sessions": sessions, "messages": count,
        "smtp_source_exit": done.returncode, "delivered": got, "all_delivered": delivered and got == count,
        "accepted_per_s": count / (accepted_at - start), "delivered_per_s": count / (delivered_at - start),
        "cpu_s_per_message": (after_cpu - before_cpu) / count, "peak_pss_mb": sampler.peak / 2**20,
    }


async def _session(port: int, size: int, per_session: int, latencies: list[float], interval: float = 0.0
                   ) -> None:
    """``per_session`` transactions on one connection: back to back, or one every ``interval`` seconds."""
    loop = asyncio.get_running_loop()
    await asyncio.sleep(random.uniform(0, interval))  # paced sessions start out of step
    reader, writer = await asyncio.open_connection(HOST, port)

    async def reply() -> bytes:
        while True:
            line = await reader.readline()
            if line[3:4] != b"-":
                return line

    await reply()
    writer.write(b"EHLO latency.bench.test\r\n")
    await reply()
    body = b"Subject: latency\r\nFrom: bench@" + DOMAIN.encode() + b"\r\n\r\n" + (b"x" * 76 + b"\r\n") * (size // 78)
    due = loop.time()
    for _ in range(per_session):
        due += interval
        began = time.monotonic()
        for line in (b"MAIL FROM:<bench@" + DOMAIN.encode() + b">", b"RCPT TO:<someone@example.net>", b"DATA"):
            writer.write(line + b"\r\n")
            await reply()
        writer.write(body + b".\r\n")
        final = await reply()
        if final.startswith(b"250"):
            latencies.append(time.monotonic() - began)
        await asyncio.sleep(max(0.0, due - loop.time()))
    writer.write(b"QUIT\r\n")
    await writer.drain()
    writer.close()


def latency(system: System, sessions: int, per_session: int, size: int, rate: float | None = None
            ) -> dict[str, Any]:
    """Transaction latency (MAIL FROM to the 250 after the dot) over ``sessions`` connections.

    Without ``rate`` every session sends back to back: the server is
    saturated and, by Little's law, latency is about sessions divided by
    throughput.  With ``rate`` the sessions together send ``rate``
    transactions a second, each on its own schedule: the latency a client
    sees under a load the server can carry.
    """
    latencies: list[float] = []
    interval = sessions / rate if rate else 0.0

    async def main() -> None:
        await asyncio.gather(*(_session(system.port, size, per_session, latencies, interval)
                               for _ in range(sessions)))

    asyncio.run(main())
    latencies.sort()
    return {"system": system.name, "sessions": sessions, "load": f"{rate:g} msg/s" if rate else "saturated",
            "transactions": len(latencies),
            "p50_ms": 1000 * latencies[len(latencies) // 2],
            "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]}


async def _hold(port: int, count: int, hosts: int = 50) -> list[asyncio.StreamWriter]:
    """``count`` greeted, idle SMTP sessions, spread over source addresses 127.0.1.x."""
    writers = []
    for n in range(count):
        reader, writer = await asyncio.open_connection(HOST, port, local_addr=(f"127.0.1.{1 + n % hosts}", 0))
        await reader.readline()  # the 220 greeting: the session is set up
        writers.append(writer)
    return writers


def idle_connections(system: System, count: int) -> dict[str, Any]:
    """Memory of ``system`` while it holds ``count`` idle sessions."""
    before = pss_bytes(system.pids())

    async def main() -> dict[str, Any]:
        writers = await _hold(system.port, count)
        await asyncio.sleep(2)
        during = pss_bytes(system.pids())
        for writer in writers:
            writer.close()
        return {"system": system.name, "connections": len(writers), "pss_mb_before": before / 2**20,
                "pss_mb_holding": during / 2**20}

    return asyncio.run(main())


def long_run(system: System, total: int, chunk: int) -> dict[str, Any]:
    """Memory after each ``chunk`` messages of a ``total``-message run."""
    samples = []
    for sent in range(chunk, total + 1, chunk):
        run = one_run(system, [], chunk, 10240, 20)
        samples.append({"messages": sent, "pss_mb": pss_bytes(system.pids()) / 2**20,
                        "all_delivered": run["all_delivered"]})
        print(json.dumps(samples[-1]), flush=True)
    return {"system": system.name, "messages": total, "samples": samples}


def ratios(runs: list[dict[str, Any]], ours: str, theirs: str, metric: str) -> dict[str, Any]:
    out = {}
    keys = sorted({(r["size"], r["sessions"]) for r in runs})
    for size, sessions in keys:
        a = [r[metric] for r in runs if (r["system"], r["size"], r["sessions"]) == (ours, size, sessions)]
        b = [r[metric] for r in runs if (r["system"], r["size"], r["sessions"]) == (theirs, size, sessions)]
        pairs = [x / y for x, y in zip(a, b, strict=False) if y]
        if pairs:
            out[f"{size}B x {sessions}"] = {"median": statistics.median(pairs), "min": min(pairs), "max": max(pairs)}
    return out


def report(results: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    lines = [f"# kubemta vs Postfix ({results['machine']}, {results['date']})", "",
             "| system | size | sessions | accepted/s | delivered/s | CPU ms/msg | peak PSS MB |",
             "|---|---|---|---|---|---|---|"]
    groups: dict[tuple[str, int, int], list[dict[str, Any]]] = {}
    for run in results["runs"]:
        groups.setdefault((run["system"], run["size"], run["sessions"]), []).append(run)
    for (system, size, sessions), items in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0])):
        med = {k: statistics.median(i[k] for i in items) for k in
               ("accepted_per_s", "delivered_per_s", "cpu_s_per_message", "peak_pss_mb")}
        lines.append(f"| {system} | {size} | {sessions} | {med['accepted_per_s']:.0f} | {med['delivered_per_s']:.0f} "
                     f"| {1000 * med['cpu_s_per_message']:.2f} | {med['peak_pss_mb']:.0f} |")
    for title, table in results["ratios"].items():
        lines += ["", f"## {title} (median, min-max over rounds)", "", "| size x sessions | ratio |", "|---|---|"]
        lines += [f"| {k} | {v['median']:.2f} ({v['min']:.2f}-{v['max']:.2f}) |" for k, v in table.items()]
    lines += ["", "## Latency per transaction (10 KB)", "", "| system | sessions | load | p50 ms | p99 ms |",
              "|---|---|---|---|---|"]
    lines += [f"| {r['system']} | {r['sessions']} | {r['load']} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} |"
              for r in results["latency"]]
    if "idle" in results:
        idle = results["idle"]
        lines += ["", "## Idle sessions", "", f"{idle['system']} holding {idle['connections']} greeted idle sessions: "
                  f"{idle['pss_mb_holding']:.0f} MB PSS ({idle['pss_mb_before']:.0f} MB before)."]
    if "long" in results:
        lines += ["", f"## Memory over {results['long']['messages']} messages", "",
                  "| messages | PSS MB |", "|---|---|"]
        lines += [f"| {x['messages']} | {x['pss_mb']:.0f} |" for x in results["long"]["samples"]]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench: matplotlib not installed; no chart", file=sys.stderr)
        return
    systems = sorted({r["system"] for r in results["runs"]})
    sizes = sorted({r["size"] for r in results["runs"]})
    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.8 / len(systems)
    for i, system in enumerate(systems):
        values = [statistics.median([r["delivered_per_s"] for r in results["runs"]
                                     if r["system"] == system and r["size"] == size] or [0]) for size in sizes]
        ax.bar([x + i * width for x in range(len(sizes))], values, width, label=system)
    ax.set_xticks([x + width * (len(systems) - 1) / 2 for x in range(len(sizes))])
    ax.set_xticklabels([f"{s // 1024} KB" for s in sizes])
    ax.set_ylabel("messages delivered end to end per second (median)")
    ax.set_title("kubemta vs Postfix, same machine, same run")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "throughput.png", dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="one small round: proves it works")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--sizes", default="1024,10240,102400")
    parser.add_argument("--sessions", default="1,20,100")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--latency-rate", type=float, default=200.0,
                        help="total msg/s of the paced latency measurement (besides the saturated one)")
    parser.add_argument("--idle", type=int, default=0, help="also hold this many idle sessions on kubemta")
    parser.add_argument("--long", type=int, default=0, help="also send this many messages through kubemta, "
                        "sampling its memory every tenth")
    parser.add_argument("--shared-limits", action="store_true", help="also run kubemta with its limits in a "
                        "Redis (limits.store) and a daily cap, to measure the store's cost on the hot path")
    args = parser.parse_args(argv)
    check_tools(args.shared_limits)
    if args.smoke:
        args.rounds, args.messages, args.sizes, args.sessions = 1, 200, "10240", "20"
    sizes = [int(s) for s in args.sizes.split(",")]
    session_counts = [int(s) for s in args.sessions.split(",")]
    root = Path("/var/lib/kubemta-bench") / uuid.uuid4().hex[:8]
    root.mkdir(parents=True, mode=0o755)
    Path("/var/lib/kubemta-bench").chmod(0o755)
    key = make_key(root)
    sinks = {name: Sink(root / f"sink-{name}") for name in ("kubemta", "kubemta-dkim", "postfix", "postfix-opendkim")}
    milter = OpenDkim(root / "opendkim", key)
    systems: list[System] = [Kubemta(root / "kubemta", sinks["kubemta"], None),
                             Kubemta(root / "kubemta-dkim", sinks["kubemta-dkim"], key),
                             Postfix(root / "postfix", sinks["postfix"]),
                             Postfix(root / "postfix-opendkim", sinks["postfix-opendkim"], milter.socket)]
    helpers: list[Any] = [*sinks.values(), milter]
    if args.shared_limits:
        redis = Redis(root / "redis")
        sinks["kubemta-shared"] = Sink(root / "sink-kubemta-shared")
        helpers += [redis, sinks["kubemta-shared"]]
        systems.append(Kubemta(root / "kubemta-shared", sinks["kubemta-shared"], None, redis.url))
    started: list[Any] = []
    machine = f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores, Python {platform.python_version()}"
    results: dict[str, Any] = {"machine": machine, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                               "runs": [], "latency": []}
    try:
        for item in [*helpers, *systems]:
            item.start()
            started.append(item)
        for round_no in range(args.rounds):
            order = systems if round_no % 2 == 0 else list(reversed(systems))
            for size in sizes:
                for sessions in session_counts:
                    for system in order:
                        extra = [milter] if system.name == "postfix-opendkim" else []
                        run = one_run(system, extra, args.messages, size, sessions)
                        run["round"] = round_no
                        results["runs"].append(run)
                        print(json.dumps(run), flush=True)
        for system in systems:
            for rate in (None, args.latency_rate):
                results["latency"].append(latency(system, 100 if not args.smoke else 20,
                                                  10 if not args.smoke else 3, 10240, rate))
                print(json.dumps(results["latency"][-1]), flush=True)
        if args.idle:
            results["idle"] = idle_connections(systems[0], args.idle)
            print(json.dumps(results["idle"]), flush=True)
        if args.long:
            results["long"] = long_run(systems[0], args.long, max(1, args.long // 10))
        results["ratios"] = {
            "end to end: kubemta / postfix": ratios(results["runs"], "kubemta", "postfix", "delivered_per_s"),
            "end to end: kubemta-dkim / postfix-opendkim": ratios(results["runs"], "kubemta-dkim", "postfix-opendkim",
                                                                  "delivered_per_s"),
            "accepted: kubemta / postfix": ratios(results["runs"], "kubemta", "postfix", "accepted_per_s"),
        }
        if args.shared_limits:
            results["ratios"]["end to end: kubemta-shared / kubemta"] = ratios(
                results["runs"], "kubemta-shared", "kubemta", "delivered_per_s")
    finally:
        for item in reversed(started):
            item.stop()
        shutil.rmtree(root, ignore_errors=True)
    report(results, args.out)
    lost = [r for r in results["runs"] if not r["all_delivered"]]
    lost += [{"system": "kubemta (long run)", "delivered": "not all", "messages": x["messages"]}
             for x in results.get("long", {}).get("samples", []) if not x["all_delivered"]]
    for run in lost:
        print(f"bench: {run['system']} delivered {run['delivered']} of {run['messages']}", file=sys.stderr)
    print(f"bench: results in {args.out}")
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
