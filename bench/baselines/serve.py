"""python -m bench.baselines.serve --bundle DIR --port P [--max-batch-size N --batch-timeout S]

Serve a model bundle with the engine behind LitServe's own loops (see
``bench.baselines.litserve_api``): ``--max-batch-size 1`` is no batching (one request at a
time); more is LitServe's static batching. Ready when ``GET /health`` answers 200. Stop it with
SIGINT (LitServe stops its children; SIGTERM would leave them running).
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.baselines.serve",
        description="The engine behind LitServe's static batching (or no batching), for comparison.",
    )
    p.add_argument("--bundle", required=True, help="model bundle folder")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8001, help="HTTP port (default: 8001)")
    p.add_argument(
        "--max-batch-size", type=int, default=1, help="LitAPI max_batch_size; 1: no batching (default: 1)"
    )
    p.add_argument(
        "--batch-timeout",
        type=float,
        default=0.05,
        help="LitAPI batch_timeout, seconds spent filling a batch (default: 0.05)",
    )
    p.add_argument("--log-level", default="warning", help="uvicorn log level (default: warning)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.max_batch_size < 1:
        parser.error(f"--max-batch-size must be >= 1, got {args.max_batch_size}")
    if args.batch_timeout < 0:
        parser.error(f"--batch-timeout must be >= 0 seconds, got {args.batch_timeout}")
    from bench.baselines.litserve_api import build_server

    server = build_server(args.bundle, args.max_batch_size, args.batch_timeout)
    server.run(host=args.host, port=args.port, log_level=args.log_level, generate_client_file=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
