#!/usr/bin/env bash
# Start/stop both local services: deploy/local/services.sh start|stop|status
set -euo pipefail
here="$(dirname "${BASH_SOURCE[0]}")"
case "${1:-}" in
  start) "$here/kafka.sh" start && "$here/redis.sh" start ;;
  stop) "$here/redis.sh" stop; "$here/kafka.sh" stop ;;
  status) "$here/kafka.sh" status && "$here/redis.sh" status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
