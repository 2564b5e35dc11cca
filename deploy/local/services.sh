#!/usr/bin/env bash
# Start/stop both local services: deploy/local/services.sh start|stop|status
set -euo pipefail
here="$(dirname "${BASH_SOURCE[0]}")"
case "${1:-}" in
  start) "$here/kafka.sh" start && "$here/redis.sh" start ;;
  stop) "$here/redis.sh" stop; "$here/kafka.sh" stop ;;
  status)
    rc=0
    if "$here/kafka.sh" status; then echo "kafka: running"; else echo "kafka: stopped"; rc=1; fi
    if "$here/redis.sh" status; then echo "redis: running"; else echo "redis: stopped"; rc=1; fi
    exit $rc ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
