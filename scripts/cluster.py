"""A replicated cluster on this machine: TorchServe replicas behind HAProxy (``make cluster-up``, ``cluster-down``, ``cluster-rollout``).

``up`` starts N replicas on loopback ports, HAProxy in front of them (one bearer token for the
whole cluster, checked there) and a supervisor that restarts a replica whose TorchServe dies; it
writes ``run/cluster/cluster.json`` (balancer URL, token file, replicas with their frontend pids
and addresses). ``rollout`` rolls a version out replica by replica with ``make rollout``'s smoke
gate. ``bench`` measures closed-loop throughput through the balancer. The logic is
:mod:`ops.cluster`; docs/SCALING.md says what was measured with it.

Example:
    make cluster-up REPLICAS=3
    curl -H "Authorization: Bearer $(cat run/cluster/token)" -H "Content-Type: image/jpeg" \\
         --data-binary @lesion.jpg http://127.0.0.1:8090/predictions/skin_lesion
    make release VERSION=1.6 && make cluster-rollout VERSION=1.6
    make cluster-down
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ops.cluster import CLUSTER_DIR, Cluster, ClusterError, bench, down, rolling_rollout, status, up
from ops.paths import DATA, GOLDEN_SMOKE, MODEL_STORE, SERVER_CONFIG
from ops.rollout import RolloutError


def get_args_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("action", choices=("up", "down", "status", "rollout", "bench"))
    parser.add_argument("--cluster-dir", default=str(CLUSTER_DIR))
    parser.add_argument("--replicas", type=int, default=3, help="up: number of TorchServe replicas")
    parser.add_argument("--port", type=int, default=8090, help="up: the balancer's port on 127.0.0.1")
    parser.add_argument("--model-store", default=str(MODEL_STORE))
    parser.add_argument("--config", default=str(SERVER_CONFIG), help="up: base config.properties of the replicas")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for a replica's model")
    parser.add_argument("--version", help="rollout: the version to roll out (model_store/skin_lesion_v<version>.mar)")
    parser.add_argument("--golden", default=str(GOLDEN_SMOKE))
    parser.add_argument("--golden-images", default=str(DATA), help="folder holding the golden images' folder")
    parser.add_argument("--images", default=str(DATA / "samples-600x450"), help="bench: JPEGs to send")
    parser.add_argument("--requests", type=int, default=300, help="bench: requests to send")
    parser.add_argument("--concurrency", type=int, default=6, help="bench: clients in the closed loop")
    return parser


def main(args: argparse.Namespace) -> int:
    """Run one action; returns the exit code."""
    directory = Path(args.cluster_dir)
    try:
        if args.action == "up":
            cluster = up(directory, args.replicas, Path(args.model_store), Path(args.config),
                         f"127.0.0.1:{args.port}", args.timeout)
            print(json.dumps(cluster.describe(), indent=2))
            print(f"cluster up: {cluster.url} (token in {cluster.token_file}); `make cluster-down` stops it")
        elif args.action == "down":
            stopped = down(directory)
            print(f"stopped {', '.join(stopped)}" if stopped else f"nothing running from {directory}")
        elif args.action == "status":
            print(json.dumps(status(Cluster(directory.resolve())), indent=2))
        elif args.action == "rollout":
            if not args.version:
                print("error: rollout needs --version (make cluster-rollout VERSION=x.y)", file=sys.stderr)
                return 2
            result = rolling_rollout(Cluster(directory.resolve()), args.version, Path(args.golden),
                                     Path(args.golden_images), args.timeout)
            print(f"rolled out {result['version']} on {', '.join(result['replicas'])} in {result['seconds']} s "
                  f"(previous: {result['previous']}, kept loaded for rollback)")
        else:
            print(json.dumps(bench(Cluster(directory.resolve()), Path(args.images), args.requests, args.concurrency),
                             indent=2))
    except (ClusterError, RolloutError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
