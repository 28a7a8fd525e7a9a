#!/usr/bin/env bash
# The integration tests need a real Redis on 127.0.0.1:6379. Machines of this project's kind start one;
# if it is not answering, start it here (installing Debian's redis-server when missing). Keeps nothing on disk.
set -euo pipefail
if command -v redis-cli >/dev/null && redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG; then
    exit 0
fi
if ! command -v redis-server >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
fi
redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no
for _ in $(seq 50); do
    redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG && exit 0
    sleep 0.1
done
echo "ensure-redis: Redis did not come up on 127.0.0.1:6379" >&2
exit 1
