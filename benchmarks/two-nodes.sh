# Sourced by peer-attach.sh and agent-stream.sh: two "nodes" on this one kernel, the bridge lab
# up, node-a being the caller's attach and node-b a `profiler agent` listening on
# 127.0.0.1:$PORT under the cluster's TLS (certificates in $CERTS). Everything it starts is
# ended on exit, by pid; a caller's own process goes in $SERVER.
P=${PROFILER:-target/release/profiler}
CERTS=$(mktemp -d)
AGENT=
SERVER=
cleanup() {
  # Ours, by pid.
  [ -n "$SERVER" ] && kill "$SERVER" 2>/dev/null && wait "$SERVER" 2>/dev/null || true
  [ -n "$AGENT" ] && kill "$AGENT" && wait "$AGENT" || true
  rm -rf "$CERTS"
  "$P" lab down bridge >/dev/null
}
"$P" lab up bridge >/dev/null
trap cleanup EXIT
"$P" agent --init-certs "$CERTS" --names node-a,node-b >/dev/null
"$P" agent --listen "127.0.0.1:$PORT" --tls "$CERTS" --node node-b 2>"$CERTS/agent.log" &
AGENT=$!
until grep -q "listening on" "$CERTS/agent.log"; do sleep 0.1; done
