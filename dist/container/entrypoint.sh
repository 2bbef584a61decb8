#!/bin/sh
# Container entrypoint: runs the whole meshd agent in the foreground (the
# sidecar form) until the container is stopped (SIGTERM).
#
#   MESHD_AUTHKEY      auth key; needed the first time only (with a state
#                      volume). Passed to meshd through the environment, not
#                      argv, so it does not show in ps.
#   MESHD_COORDINATOR  coordinator URL (https://HOST:PORT)
#   MESHD_STATE_DIR    state directory (default /var/lib/meshd)
#   MESHD_HOSTNAME     node name (default: the container hostname)
#   MESHD_TUN          "userspace" (default: no privileges needed) or a
#                      kernel TUN name such as meshd0 (needs NET_ADMIN and
#                      /dev/net/tun)
#   MESHD_SOCKET       local API socket (default $MESHD_STATE_DIR/meshd.sock,
#                      so `meshd status --socket ...` works via docker exec)
# Every other MESHD_* variable (MESHD_SOCKS5_SERVER, MESHD_HTTP_PROXY,
# MESHD_FORWARD, MESHD_PORT, ...) is read by meshd itself. Extra arguments
# are passed on to `meshd up`.
set -eu

state_dir=${MESHD_STATE_DIR:-/var/lib/meshd}
tun=${MESHD_TUN:-userspace}
socket=${MESHD_SOCKET:-$state_dir/meshd.sock}
hostname=${MESHD_HOSTNAME:-$(hostname)}

if [ -z "${MESHD_COORDINATOR:-}" ] && [ ! -s "$state_dir/login.json" ]; then
	echo "meshd-entrypoint: set MESHD_COORDINATOR (and MESHD_AUTHKEY) to join a tailnet" >&2
	exit 64
fi

# meshd reads MESHD_AUTHKEY and MESHD_COORDINATOR itself; unset the ones
# given as flags so that each setting has one source.
unset MESHD_STATE_DIR MESHD_TUN MESHD_SOCKET MESHD_HOSTNAME

exec meshd up --foreground \
	--state-dir "$state_dir" \
	--tun "$tun" \
	--socket "$socket" \
	--hostname "$hostname" \
	"$@"
