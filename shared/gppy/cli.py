"""The ``gppy`` command: up, process, status, simulate, demo, deep-stack."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import sys
import time
from pathlib import Path

from gppy import __version__
from gppy.config import load_settings


def cmd_up(args: argparse.Namespace) -> int:
    """Start a NATS server and every service as local processes until Ctrl-C."""
    from gppy.local import LocalStack

    stack = LocalStack(config=Path(args.config).resolve(), nats_port=args.nats_port,
                       replicas=dict(r.split("=") for r in args.scale) if args.scale else {},
                       log_dir=Path(args.log_dir) if args.log_dir else None)
    stack.replicas = {k: int(v) for k, v in stack.replicas.items()}
    missing = stack.start()
    if missing:
        print(f"not yet available, not started: {', '.join(missing)}", file=sys.stderr)
    try:
        stack.wait_healthy()
        print(f"gppy stack up: NATS at {stack.nats_url}; services: "
              + ", ".join(f"{n} (http :{stack.http_port(*_split(n))})" for n in stack.procs if n != "nats"))
        print("Ctrl-C stops everything.")
        while True:
            time.sleep(1.0)
            for name, proc in list(stack.procs.items()):
                if proc.poll() is not None:
                    print(f"{name} exited with code {proc.returncode}; restarting", file=sys.stderr)
                    if name == "nats":
                        raise RuntimeError("nats-server exited")
                    stage, rep = _split(name)
                    stack.start_stage(stage, rep)
    except KeyboardInterrupt:
        print("stopping...")
    finally:
        stack.stop()
    return 0


def _split(name: str) -> tuple[str, int]:
    stage, rep = name.rsplit("-", 1)
    return stage, int(rep)


def cmd_process(args: argparse.Namespace) -> int:
    """Publish a night-ready event for NIGHT_DIR (v1's ad hoc main routine)."""
    from gppy import naming
    from gppy.messages import NightReady, check_paths
    from gppy.progress import follow_night

    settings = load_settings(config=args.config, nats_url=args.nats)
    night_dir = Path(args.night_dir).resolve()
    if not night_dir.is_dir():
        print(f"{night_dir}: not a directory", file=sys.stderr)
        return 2
    lane = "too" if (args.too or "_ToO_" in night_dir.name) else "survey"
    event = NightReady(night_id=naming.night_id(args.unit, night_dir), unit=args.unit.upper(), lane=lane,
                       night_dir=str(night_dir), targets=args.targets, filters=args.filters,
                       attempt=int(time.time()))
    check_paths(event, settings.paths().roots())
    if not args.wait:
        asyncio.run(_publish(settings, event))
        print(f"queued {event.night_id} ({lane})")
        return 0
    prog = asyncio.run(follow_night(settings, event.night_id, publish=event, timeout=args.timeout))
    print_outcome(prog)
    return 0 if prog.status == "done" else 1


async def _publish(settings, event) -> None:
    from gppy import bus

    nc = await bus.connect(settings, "gppy-cli")
    js = nc.jetstream()
    await bus.ensure_stream(js, settings)
    await bus.publish(js, event, settings.subject_prefix)
    await nc.drain()


def print_outcome(prog) -> None:
    if prog.status is None:
        print(f"{prog.night_id}: no night-done event before the time-out")
    else:
        print(f"{prog.night_id}: {prog.status}")
    for line in prog.failures[:50]:
        print(f"  failure: {line}")
    if prog.summary_path:
        print(f"  summary: {prog.summary_path}")


def cmd_status(args: argparse.Namespace) -> int:
    """Per-stage consumer backlog (JetStream) and each local service's /status."""
    import httpx

    from gppy.local import BASE_HTTP_PORT, STAGES

    settings = load_settings(config=args.config, nats_url=args.nats)

    async def backlog() -> dict:
        from gppy import bus

        nc = await bus.connect(settings, "gppy-cli")
        js = nc.jetstream()
        out = {}
        for stage in STAGES:
            for lane in bus.LANES:
                with contextlib.suppress(Exception):
                    info = await js.consumer_info(settings.stream, f"{stage}-{lane}")
                    out[f"{stage}-{lane}"] = {"pending": info.num_pending, "in_flight": info.num_ack_pending,
                                              "redelivered": info.num_redelivered}
        await nc.drain()
        return out

    report = {"consumers": asyncio.run(backlog()), "services": {}}
    for i, stage in enumerate(STAGES):
        try:
            report["services"][stage] = httpx.get(f"http://127.0.0.1:{BASE_HTTP_PORT + i}/status", timeout=2).json()
        except httpx.HTTPError as exc:
            report["services"][stage] = {"error": str(exc)}
    print(json.dumps(report, indent=2))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from gppy.demo import run_demo

    return run_demo(Path(args.outdir), seed=args.seed, timeout=args.timeout, keep_running=False)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gppy", description="7DT imaging pipeline (NATS microservice stack)")
    parser.add_argument("--version", action="version", version=f"gppy {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("up", help="start NATS and all services as local processes (Ctrl-C stops)")
    p.add_argument("--config", required=True, help="path.json")
    p.add_argument("--nats-port", type=int, default=4222)
    p.add_argument("--scale", nargs="*", metavar="STAGE=N", help="replicas per stage, e.g. subtract=2")
    p.add_argument("--log-dir", help="write each service's log here")
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("process", help="process one night ad hoc (publishes the night-ready event)")
    p.add_argument("unit", help="telescope unit, e.g. 7DT07")
    p.add_argument("night_dir", help="raw night folder")
    p.add_argument("--config", help="path.json (default $GPPY_CONFIG)")
    p.add_argument("--nats", help="NATS URL (default $GPPY_NATS_URL)")
    p.add_argument("--wait", action="store_true", help="show progress until the night is done")
    p.add_argument("--timeout", type=float, default=6 * 3600.0, help="seconds to wait with --wait")
    p.add_argument("--targets", nargs="*", help="only these OBJECTs")
    p.add_argument("--filters", nargs="*", help="only these FILTERs")
    p.add_argument("--too", action="store_true", help="ToO priority lane")
    p.set_defaults(func=cmd_process)

    p = sub.add_parser("status", help="queue depths and service status")
    p.add_argument("--config", help="path.json (default $GPPY_CONFIG)")
    p.add_argument("--nats", help="NATS URL")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("demo", help="simulate a small night and run it through the local stack")
    p.add_argument("--outdir", default="demo-data", help="folder for the simulated data root")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--timeout", type=float, default=1800.0)
    p.set_defaults(func=cmd_demo)

    for module in ("gppy.sim.cli", "gppy_stack.cli"):
        with contextlib.suppress(ImportError):
            importlib.import_module(module).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
