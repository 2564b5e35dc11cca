#!/usr/bin/env bash
# Local single-node Apache Kafka (KRaft: broker+controller in one JVM) on loopback.
#   deploy/local/kafka.sh fetch   resolve the official jars from Maven Central into the cache
#   deploy/local/kafka.sh start   fetch if needed, format storage once, start, wait until it answers
#   deploy/local/kafka.sh stop    stop cleanly (SIGTERM, wait, SIGKILL after 30 s)
#   deploy/local/kafka.sh status  exit 0 when running
#   deploy/local/kafka.sh reset   stop and delete the broker's data (topics, offsets)
# Idempotent: start on a running broker and stop on a stopped one do nothing.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
PID_FILE="$RUN_DIR/kafka.pid"
DATA_DIR="$LOCAL_DIR/kafka-data"
CONF="$LOCAL_DIR/kafka-server.properties"

fetch() {
  if [ -f "$KAFKA_HOME/libs/kafka_2.13-$KAFKA_VERSION.jar" ]; then return 0; fi
  log "resolving org.apache.kafka:kafka_2.13:$KAFKA_VERSION and its runtime dependencies (Maven Central)"
  command -v mvn >/dev/null || { log "mvn not found; install Maven (apt-get install maven)"; exit 1; }
  mkdir -p "$KAFKA_HOME/libs.tmp"
  mvn -q -B -f "$REPO_ROOT/deploy/local/kafka-pom.xml" dependency:copy-dependencies \
      -Dkafka.version="$KAFKA_VERSION" -DincludeScope=runtime \
      -DoutputDirectory="$KAFKA_HOME/libs.tmp" >"$LOG_DIR/kafka-fetch.log" 2>&1 \
    || { log "jar resolution failed, see $LOG_DIR/kafka-fetch.log"; exit 1; }
  rm -rf "$KAFKA_HOME/libs" && mv "$KAFKA_HOME/libs.tmp" "$KAFKA_HOME/libs"
}

write_conf() {
  cat >"$CONF" <<CONF
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$KAFKA_CONTROLLER_PORT
listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT,CONTROLLER://127.0.0.1:$KAFKA_CONTROLLER_PORT
advertised.listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=$DATA_DIR
num.partitions=4
auto.create.topics.enable=true
offsets.topic.replication.factor=1
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=4
group.initial.rebalance.delay.ms=0
share.coordinator.state.topic.replication.factor=1
log.retention.hours=168
message.max.bytes=4194304
CONF
}

java_cmd() { echo "${JAVA_HOME:+$JAVA_HOME/bin/}java"; }

start() {
  if pid_alive "$PID_FILE"; then log "kafka already running (pid $(cat "$PID_FILE"))"; return 0; fi
  if port_open "$KAFKA_PORT"; then
    if "$(java_cmd)" -cp "$KAFKA_HOME/libs/*" kafka.admin.BrokerApiVersionsCommand --bootstrap-server "127.0.0.1:$KAFKA_PORT" >/dev/null 2>&1 \
       || [ ! -d "$KAFKA_HOME/libs" ]; then
      log "a Kafka broker not started by this checkout already listens on 127.0.0.1:$KAFKA_PORT: using it (set CLICKPULSE_KAFKA_PORT for a separate one)"
      return 0
    fi
    log "port $KAFKA_PORT is taken by a process that is not a Kafka broker (set CLICKPULSE_KAFKA_PORT)"; exit 1
  fi
  fetch
  write_conf
  if [ ! -f "$DATA_DIR/meta.properties" ]; then
    local cluster_id
    cluster_id="$("$(java_cmd)" -cp "$KAFKA_HOME/libs/*" kafka.tools.StorageTool random-uuid 2>/dev/null | tail -1)"
    log "formatting KRaft storage (cluster $cluster_id)"
    "$(java_cmd)" -cp "$KAFKA_HOME/libs/*" -Dlog4j2.configurationFile="$REPO_ROOT/deploy/local/log4j2.properties" \
      -Dkafka.logs.dir="$LOG_DIR/kafka" kafka.tools.StorageTool format -t "$cluster_id" -c "$CONF" \
      >"$LOG_DIR/kafka-format.log" 2>&1 || { log "format failed, see $LOG_DIR/kafka-format.log"; exit 1; }
  fi
  mkdir -p "$LOG_DIR/kafka"
  : >"$LOG_DIR/kafka/server.log"
  log "starting kafka $KAFKA_VERSION on 127.0.0.1:$KAFKA_PORT (logs: $LOG_DIR/kafka)"
  nohup "$(java_cmd)" -Xms256m -Xmx${CLICKPULSE_KAFKA_HEAP:-768m} -XX:+UseG1GC -Djava.awt.headless=true \
    -Dlog4j2.configurationFile="$REPO_ROOT/deploy/local/log4j2.properties" -Dkafka.logs.dir="$LOG_DIR/kafka" \
    -cp "$KAFKA_HOME/libs/*" kafka.Kafka "$CONF" >"$LOG_DIR/kafka/stdout.log" 2>&1 &
  echo $! >"$PID_FILE"
  for _ in $(seq 1 120); do
    if ! pid_alive "$PID_FILE"; then log "kafka exited during start; tail of its log:"; tail -20 "$LOG_DIR/kafka/stdout.log" "$LOG_DIR/kafka/server.log" >&2; exit 1; fi
    if port_open "$KAFKA_PORT" && grep -q "Kafka Server started" "$LOG_DIR/kafka/server.log" "$LOG_DIR/kafka/stdout.log" 2>/dev/null; then
      log "kafka is up"; return 0
    fi
    sleep 0.5
  done
  log "kafka did not answer within 60 s"; exit 1
}

stop() {
  if ! pid_alive "$PID_FILE"; then rm -f "$PID_FILE"; return 0; fi
  local pid; pid="$(cat "$PID_FILE")"
  log "stopping kafka (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || { rm -f "$PID_FILE"; return 0; }; sleep 0.5; done
  log "kafka did not stop in 30 s; killing"; kill -KILL "$pid" 2>/dev/null || true; rm -f "$PID_FILE"
}

case "${1:-}" in
  fetch) fetch ;;
  start) start ;;
  stop) stop ;;
  status) pid_alive "$PID_FILE" ;;
  reset) stop; rm -rf "$DATA_DIR"; log "kafka data deleted" ;;
  *) echo "usage: $0 fetch|start|stop|status|reset" >&2; exit 2 ;;
esac
