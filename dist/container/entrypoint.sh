#!/bin/sh
# Container entrypoint: runs the whole meshd agent in the foreground (the
# sidecar form) until the container is stopped (SIGTERM).
#
#   MESHD_AUTHKEY      auth key; needed the first time only (with a state
#                      volume). Passed to meshd through the environment, not
#                      argv, so it does not show in ps, and so that meshd
#                      uses it only when the node must enrol (first start,
#                      node deleted or expired) and otherwise ignores it with
#                      a note. (`--authkey` typed as an argument on a
#                      registered node is an error without --force-reauth.)
#   MESHD_COORDINATOR  coordinator URL (https://HOST:PORT)
#   MESHD_STATE_DIR    state directory (default /var/lib/meshd)
#   MESHD_HOSTNAME     node name (default: the container hostname, used only
#                      when the node registers: a recreated container with
#                      the same state volume keeps its name). A set
#                      MESHD_HOSTNAME that differs from the registered name
#                      is an error: meshd does not rename an enrolled node.
#   MESHD_TUN          "userspace" (default: no privileges needed) or a
#                      kernel TUN name such as meshd0 (needs NET_ADMIN and
#                      /dev/net/tun)
#   MESHD_SOCKET       local API socket (default $MESHD_STATE_DIR/meshd.sock,
#                      so `meshd status --socket ...` works via docker exec)
# Every other MESHD_* variable (MESHD_SOCKS5_SERVER, MESHD_HTTP_PROXY,
# MESHD_FORWARD, MESHD_PORT, MESHD_METRICS_LISTEN, ...) is read by meshd
# itself. Extra arguments are passed on to `meshd up`.
#
# Probes (Docker HEALTHCHECK, Kubernetes startup/readiness/liveness; see
# docs/health.md), run in the container with the same environment:
#   meshd-entrypoint probe ready   exit 0 only while the node is running
#                                  (`meshd status`); the reason on stderr
#   meshd-entrypoint probe live    exit 0 while the daemon answers its local
#                                  API, whatever the node's state
set -eu

state_dir=${MESHD_STATE_DIR:-/var/lib/meshd}
tun=${MESHD_TUN:-userspace}
socket=${MESHD_SOCKET:-$state_dir/meshd.sock}

if [ "${1:-}" = probe ]; then
	case "${2:-}" in
	ready)
		exec meshd status --socket "$socket" >/dev/null ;;
	live)
		# Any answer from the local API is life; a node that is merely
		# not running is for the readiness probe to report.
		exec meshd metrics --socket "$socket" >/dev/null ;;
	*)
		echo "meshd-entrypoint: usage: meshd-entrypoint probe ready|live" >&2
		exit 64 ;;
	esac
fi
registered=false
if [ -s "$state_dir/login.json" ]; then
	registered=true
fi

if [ -z "${MESHD_COORDINATOR:-}" ] && [ "$registered" = false ]; then
	echo "meshd-entrypoint: set MESHD_COORDINATOR (and MESHD_AUTHKEY) to join a tailnet" >&2
	exit 64
fi

# The container hostname names a node that registers now; a registered
# node keeps its name unless MESHD_HOSTNAME asks for one.
if [ -n "${MESHD_HOSTNAME:-}" ]; then
	set -- --hostname "$MESHD_HOSTNAME" "$@"
elif [ "$registered" = false ]; then
	set -- --hostname "$(hostname)" "$@"
fi

# meshd reads MESHD_AUTHKEY and MESHD_COORDINATOR itself; unset the ones
# given as flags so that each setting has one source.
unset MESHD_STATE_DIR MESHD_TUN MESHD_SOCKET MESHD_HOSTNAME

exec meshd up --foreground \
	--state-dir "$state_dir" \
	--tun "$tun" \
	--socket "$socket" \
	"$@"
