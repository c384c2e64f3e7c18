"""The phases of a run: rows, Redis calls, the long run, 2 workers, LiteLLM, the profile."""

from __future__ import annotations

import argparse
import hashlib
import time
from typing import Any

from bench import loadgen, procs, profiling, redisstats, report, services
from bench.services import PLAIN, STREAM, UPSTREAM_KEY

CONCURRENCY = (1, 16, 64)
STATS_CONCURRENCY = 16
LONG_CONCURRENCY = 16
LONG_SEGMENTS = 5
CHAT = "/v1/chat/completions"


class Phases:
    def __init__(
        self, args: argparse.Namespace, run: procs.Processes, cpus: tuple[str | None, str | None]
    ) -> None:
        self.args = args
        self.run = run
        self.gateway_cpus, self.load_cpus = cpus
        self.redis: Any = None
        self.upstream: services.Upstream | None = None
        self.gateway: services.Gateway | None = None
        self.key = ""
        self.rows: dict[tuple[str, int], dict[str, Any]] = {}
        self.directs: dict[tuple[bool, int], dict[str, Any]] = {}
        self.waited = 0.0  # seconds spent waiting for other processes to quieten

    # -- servers

    def start(self, workers: int = 1, cpus: str | None = None) -> services.Gateway:
        if self.redis is None:
            self.redis = services.start_redis(self.run, self.load_cpus)
            self.upstream = services.start_nginx(self.run, self.load_cpus)
        assert self.upstream is not None
        cpus = cpus or (self.gateway_cpus if workers == 1 else None)
        port = self.redis.connection_pool.connection_kwargs["port"]
        self.gateway = services.start_gateway(self.run, self.upstream, port, workers, cpus)
        self.key = self.key or services.mint_key(self.gateway)
        self.gateway.key = self.key
        loadgen.wrk(self.target(self.gateway, "plain"), 16, seconds=2, cpus=self.load_cpus)
        return self.gateway

    def stop_gateway(self) -> None:
        if self.gateway is not None:
            self.run.stop_pid(self.gateway.pid)
            self.gateway = None

    def target(self, server: services.Gateway | None, kind: str) -> loadgen.Target:
        """Where `kind` requests go: the gateway or proxy `server`, or (None) nginx itself."""
        stream = kind.startswith("stream")
        if server is None:
            assert self.upstream is not None
            path = f"/{'stream' if stream else 'plain'}/v1/chat/completions"
            return loadgen.Target(self.upstream.url, path, UPSTREAM_KEY, "gpt-bench")
        return loadgen.Target(server.url, CHAT, server.key, STREAM if stream else PLAIN)

    # -- measuring

    def measure(
        self, kind: str, target: loadgen.Target, concurrency: int, focus: list[int]
    ) -> dict[str, Any]:
        """One row cell; `focus` are the processes whose CPU per request is reported."""
        seconds, cpus = self.args.seconds, self.load_cpus
        fixed, salt = kind.endswith("hit"), loadgen.new_salt()
        if kind == "hit":  # the first request primes the entry the others hit
            loadgen.wrk(target, 1, limit=1, fixed=True, salt=salt, cpus=cpus)
        servers = [p.pid for _, p in self.run.started]
        self.waited += procs.wait_for_quiet(self.args.quiet_seconds)
        with procs.CpuMeter(servers, focus) as meter:
            if kind.startswith("stream"):
                result = loadgen.stream_client(
                    target, concurrency, seconds=seconds, fixed=fixed, cpus=cpus
                )
            else:
                result = loadgen.wrk(target, concurrency, seconds=seconds, fixed=fixed, salt=salt,
                                     cpus=cpus)  # fmt: skip
        result["cpu_ms_per_request"] = meter.focus_seconds * 1000 / max(result["requests"], 1)
        result["other_cores"] = meter.other_cores
        _check_cache(kind, target, result)
        return result

    def direct(self, kind: str, concurrency: int) -> dict[str, Any]:
        """nginx straight, measured once per concurrency for misses and hits alike."""
        stream = kind.startswith("stream")
        if (stream, concurrency) not in self.directs:
            base = "stream" if stream else "plain"
            self.directs[stream, concurrency] = self.measure(
                base, self.target(None, base), concurrency, []
            )
        return self.directs[stream, concurrency]

    def row(self, kind: str, concurrency: int) -> dict[str, Any]:
        assert self.gateway is not None
        direct = self.direct(kind, concurrency)
        target = self.target(self.gateway, kind)
        gateway = self.measure(kind, target, concurrency, self.gateway.worker_pids)
        row = {"kind": kind, "concurrency": concurrency, "direct": direct, "gateway": gateway}
        row |= {
            "ratio_rps": gateway["rps"] / direct["rps"],
            "added_p50_ms": gateway["p50_ms"] - direct["p50_ms"],
            "gateway_cpu_ms": gateway["cpu_ms_per_request"],
            "other_cores": max(direct["other_cores"], gateway["other_cores"]),
        }
        if kind.startswith("stream"):
            row["added_ttfb_p50_ms"] = gateway["ttfb_p50_ms"] - direct["ttfb_p50_ms"]
        _progress(row)
        return row

    def all_rows(self) -> None:
        for concurrency in CONCURRENCY:
            for kind in report.KINDS:
                self.rows[kind, concurrency] = self.row(kind, concurrency)

    # -- Redis

    def redis_phase(self, kind: str) -> dict[str, Any]:
        assert self.gateway is not None
        target, count = self.target(self.gateway, kind), self.args.stats_requests
        salt, cpus = loadgen.new_salt(), self.load_cpus
        if kind == "hit":
            loadgen.wrk(target, 1, limit=1, fixed=True, salt=salt, cpus=cpus)
        usage = f"gw:{{{self.key_id}}}:usage"
        before = self.redis.xlen(usage)
        self.redis.config_resetstat()
        monitor = redisstats.Monitor(self.run, self.redis_port, f"monitor-{kind}")
        time.sleep(0.3)  # MONITOR attached before the first request
        if kind.startswith("stream"):
            loadgen.stream_client(target, STATS_CONCURRENCY, requests=count,
                                  fixed=kind == "stream_hit", cpus=cpus)  # fmt: skip
        else:
            loadgen.wrk(target, STATS_CONCURRENCY, limit=count, fixed=kind == "hit", salt=salt,
                        cpus=cpus)  # fmt: skip
        time.sleep(0.5)  # a stream settles after its last byte
        calls = redisstats.command_calls(self.redis)
        sent, scripted = monitor.stop()
        # Served requests, counted by Redis: one usage record each (wrk may cut some short).
        served = self.redis.xlen(usage) - before
        return redisstats.phase_stats(calls, sent, scripted, served)

    @property
    def key_id(self) -> str:
        return hashlib.sha256(self.key.encode()).hexdigest()[:16]

    @property
    def redis_port(self) -> int:
        return int(self.redis.connection_pool.connection_kwargs["port"])

    # -- memory

    def sample(self, requests: int) -> dict[str, Any]:
        assert self.gateway is not None
        return {
            "requests": requests,
            "rss_kib": [procs.rss_kib(pid) for pid in self.gateway.worker_pids],
            "redis_used_memory": redisstats.used_memory(self.redis),
            "key": redisstats.key_state(self.redis, self.key_id),
        }

    def long_run(self) -> dict[str, Any]:
        assert self.gateway is not None
        target, asked = self.target(self.gateway, "plain"), self.args.long
        deadline = time.monotonic() + self.args.long_seconds
        samples, done = [self.sample(0)], 0
        for _ in range(LONG_SEGMENTS):
            left = deadline - time.monotonic()
            if left < 1:
                break
            result = loadgen.wrk(target, LONG_CONCURRENCY, limit=asked // LONG_SEGMENTS,
                                 seconds=left, no_store=True, cpus=self.load_cpus)  # fmt: skip
            done += result["requests"]
            samples.append(self.sample(done))
            print(f"  long run: {done} requests, RSS {samples[-1]['rss_kib']} KiB", flush=True)
        return _growth(samples, asked, done)

    # -- the other servers

    def two_workers(self) -> None:
        self.stop_gateway()
        gateway = self.start(workers=2)
        for concurrency in CONCURRENCY:
            result = self.measure("plain", self.target(gateway, "plain"), concurrency,
                                  gateway.worker_pids)  # fmt: skip
            self.rows["plain", concurrency]["gateway_2w"] = result
            print(f"  2 workers c={concurrency}: {result['rps']:.0f} req/s", flush=True)
        self.stop_gateway()

    def litellm(self) -> str:
        if services.litellm_binary() is None:
            return f"not installed: {LITELLM_HOWTO}"
        self.stop_gateway()
        assert self.upstream is not None
        try:
            proxy = services.start_litellm(self.run, self.upstream, self.gateway_cpus)
        except RuntimeError as exc:
            return f"could not start: {exc}: {self.run.log_tail('litellm', 5)}"
        for concurrency in CONCURRENCY:
            for kind in ("plain", "stream"):
                result = self.measure(kind, self.target(proxy, kind), concurrency, [proxy.pid])
                row = self.rows[kind, concurrency]
                row["litellm"] = result
                row["gateway_vs_litellm_rps"] = row["gateway"]["rps"] / max(result["rps"], 1e-9)
                print(f"  LiteLLM {kind} c={concurrency}: {result['rps']:.0f} req/s", flush=True)
        self.run.stop_pid(proxy.pid)
        return "ran"

    def one_core(self) -> list[dict[str, Any]]:
        """The c=1 rows again with the gateway on the same core as everything else.

        With the gateway on its own core, each of its four hops per request (client, Redis,
        upstream, Redis) wakes an idle core, which on this virtual machine costs tens of
        microseconds; the direct path (wrk and nginx on one core) pays none. Sharing the
        core measures both paths alike; at c=1 nothing competes for it.
        """
        self.stop_gateway()
        self.start(cpus=self.load_cpus)
        rows = []
        for kind in report.KINDS:
            self.directs.pop((kind.startswith("stream"), 1), None)  # measured back to back
            row = self.row(kind, 1)
            rows.append(row)
        self.stop_gateway()
        return rows

    # -- everything

    def all(self) -> dict[str, Any]:
        self.start()
        print("rows (direct = nginx itself; gateway = 1 worker)", flush=True)
        self.all_rows()
        print("Redis calls per request", flush=True)
        redis = {kind: self.redis_phase(kind) for kind in report.KINDS}
        print(f"long run: {self.args.long} requests (at most {self.args.long_seconds:.0f} s)")
        memory = self.long_run()
        if self.args.with_2w:
            print("2 workers", flush=True)
            self.two_workers()
        litellm = "skipped (--no-litellm, or --quick without --litellm)"
        if self.args.with_litellm:
            print("LiteLLM proxy", flush=True)
            litellm = self.litellm()
        results = self.results(redis, memory, litellm)
        if self.gateway_cpus:
            print("c=1 with the gateway on the same core as the rest", flush=True)
            results["one_core"] = self.one_core()
        return results

    def results(
        self, redis: dict[str, Any], memory: dict[str, Any], litellm: str
    ) -> dict[str, Any]:
        mode = "quick" if self.args.quick else "full"
        pinned = f"gateway on cpu {self.gateway_cpus}, the rest on {self.load_cpus}"
        meta = {
            "mode": mode,
            "row_seconds": self.args.seconds,
            "pinning": pinned if self.gateway_cpus else "none",
            "litellm": litellm,
            "seconds_waiting_for_quiet": round(self.waited, 1),
            "title": f"ai-gateway bench ({mode}, {procs.CPU_COUNT} cores, "
            f"{pinned if self.gateway_cpus else 'unpinned'})",
        }
        order = list(report.KINDS)
        rows = [self.rows[k] for k in sorted(self.rows, key=lambda k: (order.index(k[0]), k[1]))]
        return {"meta": meta, "rows": rows, "redis": redis, "memory": memory}

    def profile(self) -> dict[str, Any]:
        gateway = self.start()
        seconds = 10 if self.args.quick else 20
        raw = report.RESULTS / "profile-raw.txt"
        report.RESULTS.mkdir(exist_ok=True)
        target = self.target(gateway, "plain")
        concurrency = self.args.concurrency
        unprofiled = loadgen.wrk(target, concurrency, seconds=5, cpus=self.load_cpus)
        spy = profiling.record(gateway.worker_pids[0], seconds, raw, self.load_cpus)
        time.sleep(1)  # attached
        profiled = loadgen.wrk(target, concurrency, seconds=seconds - 2, cpus=self.load_cpus)
        spy.wait(timeout=seconds + 60)
        summary = profiling.summarise(raw)
        summary["rps_unprofiled"], summary["rps_profiled"] = unprofiled["rps"], profiled["rps"]
        summary["concurrency"] = concurrency
        return summary


LITELLM_HOWTO = (
    "python3 -m venv bench/.litellm-venv && bench/.litellm-venv/bin/pip install 'litellm[proxy]'"
)


def _check_cache(kind: str, target: loadgen.Target, result: dict[str, Any]) -> None:
    if not target.path.startswith(CHAT) or target.model not in (PLAIN, STREAM):
        return
    expected = result["requests"] if kind.endswith("hit") else 0
    if result.get("cache_hits", expected) != expected:
        hits, requests = result["cache_hits"], result["requests"]
        print(f"  warning: {kind} row had {hits} cache hits of {requests} requests")


def _progress(row: dict[str, Any]) -> None:
    gateway, direct = row["gateway"], row["direct"]
    print(
        f"  {row['kind']:<10} c={row['concurrency']:<3} direct {direct['rps']:8.0f} req/s "
        f"p50 {direct['p50_ms']:6.2f} ms | gateway {gateway['rps']:7.0f} req/s "
        f"p50 {gateway['p50_ms']:7.2f} p99 {gateway['p99_ms']:7.2f} ms "
        f"cpu {gateway['cpu_ms_per_request']:.2f} ms/req",
        flush=True,
    )


def _growth(samples: list[dict[str, Any]], asked: int, done: int) -> dict[str, Any]:
    first, last = samples[0], samples[-1]
    usage = last["key"]["bytes"]["usage"] - first["key"]["bytes"]["usage"]
    marks = sum(last["key"]["bytes"][p] - first["key"]["bytes"][p] for p in ("resv", "lease"))
    redis_delta = last["redis_used_memory"] - first["redis_used_memory"]
    rss = [b - a for a, b in zip(first["rss_kib"], last["rss_kib"], strict=True)]
    return {
        "requests": done,
        "asked": asked,
        "cut_by_time": done < asked,
        "concurrency": LONG_CONCURRENCY,
        "samples": samples,
        "rss_growth_kib": rss,
        "redis_growth_bytes": redis_delta,
        "redis_growth_usage_records_bytes": usage,
        "redis_growth_settled_marks_bytes": marks,
        "redis_growth_other_bytes": redis_delta - usage - marks,
    }
