"""Start, stop, or send one image to the project's TorchServe (``make serve``, ``make stop``, ``make predict``).

``start`` brings back the version that rollouts made the default (and the previous one, for
``make rollback``), as recorded in the run folder; without a rollout record it serves the
configured release. The logic is :mod:`ops.torchserve` and :func:`ops.rollout.start_serving`.

Example:
    python scripts/serve.py start --run-dir run     # waits until the model is READY
    python scripts/serve.py stop --run-dir run
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ops.client import ServiceClient
from ops.paths import MODEL_NAME, MODEL_STORE, RUN_DIR, SERVER_CONFIG
from ops.rollout import RolloutError, start_serving
from ops.torchserve import Server, stop


def get_args_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    parser = argparse.ArgumentParser(description="Run the skin-lesion TorchServe deployment")
    parser.add_argument("action", choices=("start", "stop", "predict"))
    parser.add_argument("--run-dir", default=str(RUN_DIR), help="instance folder (config, keys, logs, pids)")
    parser.add_argument("--model-store", default=str(MODEL_STORE))
    parser.add_argument("--config", default=str(SERVER_CONFIG))
    parser.add_argument("--timeout", type=float, default=180.0)
    parser.add_argument("--image", help="image to send with 'predict'")
    return parser


def main(args: argparse.Namespace) -> int:
    """Run one action; returns the process exit code."""
    server = Server(Path(args.run_dir).resolve())
    if args.action == "start":
        try:
            started = start_serving(server.run_dir, Path(args.model_store).resolve(), Path(args.config),
                                    timeout=args.timeout)
        except (RolloutError, RuntimeError, TimeoutError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        for note in started.notes:
            print(f"warning: {note}", file=sys.stderr)
        print(f"TorchServe is up (pid {server.launcher_pid}), model {MODEL_NAME} version "
              f"{started.description.get('modelVersion')} READY (the default)")
        print(f"logs: {server.run_dir / 'logs'}; inference token in {server.run_dir / 'key_file.json'}")
        print("try:\n  make predict IMAGE=../shared/data/samples-600x450/ISIC_0024354.jpg\nor:\n"
              f"  curl -H \"Authorization: Bearer $(python -c \"import json;print(json.load(open('{server.run_dir}/key_file.json'))['inference']['key'])\")\" "
              f"-T IMAGE.jpg {server.url('inference')}/predictions/{MODEL_NAME}")
        return 0
    if args.action == "stop":
        print("stopped" if stop(server) else "no server running")
        return 0
    if not server.is_running():
        print(f"no server running from {server.run_dir}", file=sys.stderr)
        return 1
    if not args.image:
        print("predict needs --image", file=sys.stderr)
        return 2
    response = ServiceClient(server).predict(data=Path(args.image).read_bytes())
    print(json.dumps(response.json(), indent=2))
    return 0 if response.ok else 1


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
