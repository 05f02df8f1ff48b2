#!/bin/sh
# Runs the container's command. KServe's runtime command is `torchserve --start ...`, which
# daemonizes and returns; in a container TorchServe must stay the main process (signals,
# restarts, logs on stdout), so --foreground is added when the command starts TorchServe
# without it. --ncs (no config snapshots: TorchServe 0.12 has no property for it) is added
# the same way, so that even KServe's stock command writes none.
set -eu
if [ "${1:-}" = "torchserve" ]; then
  case " $* " in
    *" --start "*)
      case " $* " in *" --foreground "*) ;; *) set -- "$@" --foreground ;; esac
      case " $* " in *" --ncs "*|*" --no-config-snapshots "*) ;; *) set -- "$@" --ncs ;; esac
      ;;
  esac
fi
exec "$@"
