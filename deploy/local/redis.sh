#!/usr/bin/env bash
# Local Redis (Debian's redis-server) on loopback, no persistence.
#   deploy/local/redis.sh start|stop|status     (installs redis-server with apt if missing)
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
PID_FILE="$RUN_DIR/redis.pid"

install() {
  command -v redis-server >/dev/null && return 0
  log "installing redis-server (apt)"
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq >"$LOG_DIR/redis-install.log" 2>&1
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >>"$LOG_DIR/redis-install.log" 2>&1 \
    || { log "apt-get install redis-server failed, see $LOG_DIR/redis-install.log"; exit 1; }
}

start() {
  if pid_alive "$PID_FILE"; then log "redis already running (pid $(cat "$PID_FILE"))"; return 0; fi
  install
  if redis-cli -p "$REDIS_PORT" ping 2>/dev/null | grep -q PONG; then
    log "a Redis not started by this checkout already answers on 127.0.0.1:$REDIS_PORT: using it (set CLICKPULSE_REDIS_PORT for a separate one)"
    return 0
  fi
  log "starting redis on 127.0.0.1:$REDIS_PORT (log: $LOG_DIR/redis.log)"
  redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --save "" --appendonly no --daemonize yes \
    --pidfile "$PID_FILE" --logfile "$LOG_DIR/redis.log" --dir "$RUN_DIR"
  for _ in $(seq 1 40); do
    if redis-cli -p "$REDIS_PORT" ping 2>/dev/null | grep -q PONG; then log "redis is up"; return 0; fi
    sleep 0.25
  done
  log "redis did not answer within 10 s"; exit 1
}

stop() {
  if ! pid_alive "$PID_FILE"; then rm -f "$PID_FILE"; return 0; fi
  log "stopping redis"
  redis-cli -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1 || kill "$(cat "$PID_FILE")" 2>/dev/null || true
  for _ in $(seq 1 40); do pid_alive "$PID_FILE" || { rm -f "$PID_FILE"; return 0; }; sleep 0.25; done
  kill -KILL "$(cat "$PID_FILE")" 2>/dev/null || true; rm -f "$PID_FILE"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) pid_alive "$PID_FILE" ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
