"""``gppy deep-stack OBJ FILT``: ask the stack service for a deep stack (or a 7DT reference).

Kept light: :mod:`gppy.cli` imports this module to build its parser, so heavy imports happen
only when the command runs.
"""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    """Add the ``deep-stack`` command to the ``gppy`` parser."""
    p = subparsers.add_parser(
        "deep-stack", help="deep stack of one target across nights (optionally a ref_7DT reference)",
        description="Publish a deep-stack request: the stack service selects the target's calibrated "
                    "singles in the processed tree, scales them by their zero points and coadds them "
                    "onto the target's tile grid.")
    p.add_argument("object", help="OBJECT, e.g. T09614")
    p.add_argument("filter", help="FILTER, e.g. m650")
    p.add_argument("--nights", nargs="*", metavar="NIGHT", help="only these nights (YYYY-MM-DD or YYYYMMDD)")
    p.add_argument("--select", choices=["seeing", "depth", "all"], default="all",
                   help="seeing: SEEING <= median; depth: UL5_1 >= median; all (default)")
    p.add_argument("--as-reference", action="store_true",
                   help="write ref_frame/<FILT>/ref_7DT_<OBJ>_..._<FILT>_<EXPTIME>.com.fits")
    p.add_argument("--config", help="path.json (default $GPPY_CONFIG)")
    p.add_argument("--nats", help="NATS URL (default $GPPY_NATS_URL)")
    p.add_argument("--too", action="store_true", help="ToO priority lane")
    p.set_defaults(func=cmd_deep_stack)


def build_request(args: argparse.Namespace):
    """The :class:`gppy.messages.DeepStackRequest` for the parsed arguments."""
    from gppy.messages import DeepStackRequest
    from gppy.naming import sanitize

    obj = sanitize(args.object, "OBJECT")
    filt = sanitize(args.filter, "FILTER")
    return DeepStackRequest(night_id=f"deep_{obj}_{filt}", unit="7DT", lane="too" if args.too else "survey",
                            object=obj, filter=filt, nights=list(args.nights) if args.nights else None,
                            select=args.select, as_reference=bool(args.as_reference))


def cmd_deep_stack(args: argparse.Namespace) -> int:
    import asyncio

    from gppy import bus
    from gppy.config import load_settings

    settings = load_settings(config=args.config, nats_url=args.nats)
    request = build_request(args)

    async def send() -> None:
        nc = await bus.connect(settings, "gppy-deep-stack")
        try:
            js = nc.jetstream()
            await bus.ensure_stream(js, settings)
            await bus.publish(js, request, settings.subject_prefix)
        finally:
            await nc.drain()

    asyncio.run(send())
    what = "7DT reference" if request.as_reference else "deep stack"
    print(f"requested a {what} of {request.object} in {request.filter} "
          f"(select={request.select}, nights={request.nights or 'all'}) on "
          f"{request.subject(settings.subject_prefix)}")
    return 0
