#!/bin/sh
# Runs the container's command. KServe's runtime command is `torchserve --start ...`, which
# daemonizes and returns; in a container TorchServe must stay the main process (signals,
# restarts, logs on stdout), so --foreground is added when the command starts TorchServe
# without it.
set -eu
if [ "${1:-}" = "torchserve" ]; then
  case " $* " in
    *" --foreground "*) ;;
    *" --start "*) set -- "$@" --foreground ;;
  esac
fi
exec "$@"
