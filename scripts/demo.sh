#!/usr/bin/env bash
# Sets up, starts the service on the default model, writes example.png, and keeps serving until
# Ctrl-C. With --once it stops the server after writing the image.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
HTTP_PORT=${LDM_HTTP_PORT:-8000} GRPC_PORT=${LDM_GRPC_PORT:-8001} METRICS_PORT=${LDM_METRICS_PORT:-8002}
REST_PORT=${LDM_REST_PORT:-8080} API_PORT=${LDM_API_PORT:-50051}
mkdir -p out
# the shipped model when present (re-exported only if it changed), else a tiny random one
model=()
if [ -f checkpoints/ldm-shapes/model_index.json ]; then model=(--checkpoint checkpoints/ldm-shapes); fi
.venv/bin/ldm serve "${model[@]}" --http-port "$HTTP_PORT" --grpc-port "$GRPC_PORT" --metrics-port "$METRICS_PORT" \
  --gateway-rest-port "$REST_PORT" --gateway-grpc-port "$API_PORT" --log-file out/tritonserver.log > out/serve.log 2>&1 &
server=$!
trap 'kill -TERM $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT
echo "starting the service (log: out/serve.log) ..."
until grep -q "^ready" out/serve.log; do
  if ! kill -0 $server 2>/dev/null; then cat out/serve.log; exit 1; fi
  sleep 1
done
grep "^ready" out/serve.log
.venv/bin/ldm generate "a large red circle on the left of a black background" --seed 7 \
  --url "localhost:$API_PORT" -o example.png
if [ "${1:-}" != "--once" ]; then
  echo "serving; Ctrl-C to stop"
  wait $server
fi
