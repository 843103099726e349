"""`covspec edge serve|stats`: the edge runtime (target VLM) and its counters."""

from __future__ import annotations

import argparse

from covspec.cli.options import add_client_key_args, add_command, add_threads_arg, client_keys, warn_threads
from covspec.errors import CovspecError


def register(sub: argparse._SubParsersAction) -> None:
    from covspec.edge_runtime.settings import SCHEDULES, EdgeSettings
    from covspec.transport.protocol import DEFAULT_LIMITS

    defaults = EdgeSettings()
    p = add_command(sub, "edge", "the edge runtime (target VLM)")
    edge_sub = p.add_subparsers(dest="edge_command", required=True, metavar="ACTION")
    q = add_command(edge_sub, "serve", "serve a target checkpoint over ZeroMQ (ROUTER)")
    q.add_argument("--model", required=True, help="target checkpoint folder, or an edge bundle (covspec export's OUT/edge)")
    q.add_argument("--bind", default=defaults.bind, help="ZeroMQ endpoint to bind")
    q.add_argument("--draft", default=None,
                   help="a draft checkpoint (or edge bundle) of the target's tokenizer, run beside it: serves mode "
                        "edge_sd (the edge drafts and verifies) and covspec devices that hand drafting over "
                        "(default: the edge bundle's own draft when it carries one, else none; 'none': no draft)")
    q.add_argument("--draft-sessions", type=int, default=defaults.draft_sessions,
                   help="offer to draft for devices that can draft themselves while at most this many sessions "
                        "are unfinished (0: never; edge_sd is always served)")
    q.add_argument("--no-draft-streams", dest="draft_streams", action="store_false",
                   help="serve a covspec device's plain STREAM (its draft still prefilling, or not paying on its link) "
                        "token by token instead of drafting it with the edge's draft (default: drafted, the same answer)")
    q.add_argument("--metrics", default=None, metavar="HOST:PORT",
                   help="serve the edge's counters for Prometheus at http://HOST:PORT/metrics (default: off)")
    add_threads_arg(q)
    add_placement_args(q)
    add_static_args(q)
    g = q.add_argument_group("authentication (ZeroMQ CURVE)")
    g.add_argument("--auth", choices=["curve", "none"], default="curve",
                   help="curve (the default) admits only devices whose public keys are in --allow, and refuses "
                        "to start without --key and --allow; serving every device unauthenticated must be asked "
                        "for by name: --auth none")
    g.add_argument("--key", help="the edge's secret key file (NAME.key_secret from `covspec keys gen`)")
    g.add_argument("--allow", help="folder of allowed device public keys (*.key)")
    g = q.add_argument_group("limits")
    g.add_argument("--max-sessions", type=int, default=defaults.max_sessions, help="open sessions in all")
    g.add_argument("--max-sessions-per-device", type=int, default=defaults.max_sessions_per_device,
                   help="open sessions per device: per public key with CURVE, per connection without")
    g.add_argument("--idle-timeout", type=float, default=defaults.idle_timeout_s,
                   help="seconds before an idle session is freed")
    g.add_argument("--drain-timeout", type=float, default=defaults.drain_timeout_s,
                   help="on SIGTERM the edge drains: open sessions finish, new OPENs are refused (DRAINING: the "
                        "device tries another edge), and it exits when none is unfinished or after this many "
                        "seconds (keep it under the orchestrator's grace period); SIGINT (Ctrl-C) stops at once")
    g.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens,
                   help="the largest answer a session may ask for")
    g.add_argument("--max-message-bytes", type=int, default=DEFAULT_LIMITS.max_total_bytes,
                   help="bytes of one message, all frames")
    g.add_argument("--max-image-bytes", type=int, default=DEFAULT_LIMITS.max_image_bytes,
                   help="bytes of an encoded image")
    g.add_argument("--max-image-pixels", type=int, default=defaults.max_image_pixels,
                   help="pixels of a decoded image")
    g.add_argument("--max-window", type=int, default=DEFAULT_LIMITS.max_window,
                   help="drafted tokens in one VERIFY")
    g = q.add_argument_group("batched verification")
    g.add_argument("--batch-wait-ms", type=float, default=defaults.batch_wait_ms,
                   help="how long a VERIFY may wait for other sessions' VERIFYs to share its target pass; "
                        "0: no batching")
    g.add_argument("--max-batch", type=int, default=defaults.max_batch,
                   help="requests gathered into one batched round at most")
    g.add_argument("--schedule", choices=SCHEDULES, default=defaults.schedule,
                   help="which held requests a round takes: slo (windows first, furthest behind their answer's "
                        "pace first; OPENs held while --slo allows) or fifo (arrival order)")
    g.add_argument("--slo", default=str(defaults.slo), metavar="ttft=MS,tpot=MS",
                   help=f"the latency SLO the slo schedule keeps answers to (default: {defaults.slo})")
    q.set_defaults(handler=run_serve)

    q = add_command(edge_sub, "stats", "print a running edge's counters (a STATS request) as JSON")
    q.add_argument("--edge", required=True, help="edge endpoint, e.g. tcp://127.0.0.1:5555")
    add_client_key_args(q, "this device's secret key file, for an edge with --auth curve")
    q.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the reply")
    q.set_defaults(handler=run_stats)

    q = add_command(edge_sub, "ping", "wait until an edge answers (at most --timeout seconds), print its round trip")
    q.add_argument("--edge", required=True, help="edge endpoint, e.g. tcp://127.0.0.1:5555")
    add_client_key_args(q, "this device's secret key file, for an edge with --auth curve")
    q.add_argument("--timeout", type=float, default=60.0,
                   help="seconds to wait for the edge to come up and answer (an edge still loading its target)")
    q.set_defaults(handler=run_ping)


def add_placement_args(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    """--device/--dtype (--edge-device/--edge-dtype with prefix "edge-"): where the target runs."""
    from covspec.edge_runtime.settings import DTYPE_NAMES

    g = parser.add_argument_group("placement of the target")
    g.add_argument(f"--{prefix}device", default="cpu",
                   help="where the target, its caches and its batched passes run: cpu, cuda or cuda:N "
                        "(refused where CUDA is not available)")
    g.add_argument(f"--{prefix}dtype", default="float32", choices=DTYPE_NAMES,
                   help="the target's weights and caches (logits are compared in float32 whatever the dtype)")


def add_static_args(parser: argparse.ArgumentParser) -> None:
    from covspec.edge_runtime.settings import EdgeSettings

    g = parser.add_argument_group("static verify path")
    g.add_argument("--static-cache", action="store_true",
                   help="verify on a static KV cache (a slot per session) with windows padded to 1,2,4,8,16,32 "
                        "tokens and batches to 1,2,4,8 sessions: static shapes")
    g.add_argument("--cuda-graphs", action="store_true",
                   help="the static path with each shape's pass captured as a CUDA graph (implies --static-cache; "
                        "CUDA only: with the target elsewhere, an error)")
    g.add_argument("--static-len", type=int, default=EdgeSettings().static_len,
                   help="positions per session in the static cache (capped at the model's)")


def edge_slo(text: str):
    """`--slo ttft=MS,tpot=MS` as a Slo; CovspecError naming what was wrong."""
    from covspec.slo import parse_slo

    try:
        return parse_slo(text)
    except ValueError as err:
        raise CovspecError(str(err)) from None


def server_keys(args: argparse.Namespace):
    from covspec.transport.channel import load_server_keys

    if args.auth == "none":
        if args.key or args.allow:
            raise CovspecError("--key/--allow are for --auth curve; with --auth none every device is served")
        return None
    if not args.key or not args.allow:
        raise CovspecError("--auth curve (the default) needs --key EDGE_SECRET_FILE and --allow DEVICE_KEYS_DIR "
                           "(make key pairs with `covspec keys gen`); to serve every device without "
                           "authentication, say --auth none")
    return load_server_keys(args.key, args.allow)


def run_serve(args: argparse.Namespace) -> int:
    import logging
    import signal
    import time
    from dataclasses import replace

    from covspec import api
    from covspec.edge_runtime.settings import EdgeSettings
    from covspec.transport.channel import check_endpoint
    from covspec.transport.protocol import DEFAULT_LIMITS

    requests = logging.getLogger("covspec.edge.requests")  # one JSON object per line, nothing else
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    requests.handlers[:] = [handler]
    requests.propagate = False
    check_endpoint(args.bind, "--bind")
    keys = server_keys(args)
    warn_threads(args.threads)
    limits = replace(DEFAULT_LIMITS, max_total_bytes=args.max_message_bytes, max_image_bytes=args.max_image_bytes,
                     max_window=args.max_window)
    settings = EdgeSettings(bind=args.bind, max_sessions=args.max_sessions,
                            max_sessions_per_device=args.max_sessions_per_device, idle_timeout_s=args.idle_timeout,
                            max_new_tokens=args.max_new_tokens, max_image_pixels=args.max_image_pixels,
                            limits=limits, keys=keys, batch_wait_ms=args.batch_wait_ms, max_batch=args.max_batch,
                            device=args.device, dtype=args.dtype, static_cache=args.static_cache,
                            cuda_graphs=args.cuda_graphs, static_len=args.static_len,
                            draft_sessions=args.draft_sessions, draft_streams=args.draft_streams,
                            drain_timeout_s=args.drain_timeout, schedule=args.schedule, slo=edge_slo(args.slo))
    serving = []

    def ready(server, metrics: str | None) -> None:
        auth = "no authentication (--auth none)" if keys is None else f"CURVE, devices allowed from {keys.allow_dir}"
        print(f"edge serving {args.model} on {server.endpoint} ({args.threads} threads), {auth}", flush=True)
        if metrics:
            print(f"edge metrics on http://{metrics}/metrics, probes on /healthz and /readyz", flush=True)
        serving.append(server)
        signal.signal(signal.SIGTERM, lambda *_: drain(server))

    def drain(server) -> None:
        if server.draining_since is not None:  # draining already (a burst of SIGTERMs); Ctrl-C stops at once
            return
        server.drain()
        print(f"edge draining (SIGTERM): {len(server.sessions)} session(s) open, new OPENs refused; exits when "
              f"they are finished or after {settings.drain_timeout_s:g} s", flush=True)

    try:
        api.serve_edge(args.model, settings, threads=args.threads, metrics=args.metrics, on_ready=ready,
                       draft=args.draft)
    except KeyboardInterrupt:
        print("edge stopped", flush=True)
        return 0
    if serving and serving[0].draining_since is not None:
        server = serving[0]
        left = sum(1 for s in server.sessions.values() if not s.done)
        print(f"edge drained in {time.monotonic() - server.draining_since:.2f} s, {left} unfinished session(s) "
              f"left{' (drain timeout)' if left else ''}", flush=True)
        return 1 if left else 0
    return 0


def run_stats(args: argparse.Namespace) -> int:
    import json

    from covspec.transport import protocol as wire
    from covspec.transport.channel import Client

    with Client(args.edge, timeout_s=args.timeout, retries=0, keys=client_keys(args)) as client:
        reply = client.request(wire.Stats())
    if not isinstance(reply, wire.StatsReply):
        raise CovspecError(f"the edge answered STATS with {reply.TYPE}")
    print(json.dumps(reply.counters, indent=1, sort_keys=True))
    return 0


def run_ping(args: argparse.Namespace) -> int:
    import time

    from covspec import api

    start = time.perf_counter()
    rtt = api.check_edge(args.edge, client_keys(args), timeout_s=args.timeout)
    waited = time.perf_counter() - start - rtt
    print(f"{args.edge}: up (answered after {waited:.1f} s), round trip {rtt * 1000:.1f} ms")
    return 0
