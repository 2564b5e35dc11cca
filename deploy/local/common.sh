# Shared settings for the local embedded services. Sourced, not executed.
# Everything lives under $CLICKPULSE_LOCAL_DIR (default: <repo>/.local): jars, data, logs, pids.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
LOCAL_DIR="${CLICKPULSE_LOCAL_DIR:-$REPO_ROOT/.local}"
KAFKA_VERSION="4.0.2"            # pinned; keep in sync with deploy/local/kafka-pom.xml
KAFKA_PORT="${CLICKPULSE_KAFKA_PORT:-9092}"
KAFKA_CONTROLLER_PORT="${CLICKPULSE_KAFKA_CONTROLLER_PORT:-9093}"
REDIS_PORT="${CLICKPULSE_REDIS_PORT:-6379}"
KAFKA_HOME="$LOCAL_DIR/kafka-$KAFKA_VERSION"
LOG_DIR="$LOCAL_DIR/logs"
RUN_DIR="$LOCAL_DIR/run"
mkdir -p "$LOG_DIR" "$RUN_DIR"
log() { echo "[clickpulse-local] $*" >&2; }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
