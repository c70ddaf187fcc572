#!/bin/sh
# A stand-in application for docker-compose.yml: calls a function and publishes an event
# every few seconds, as the `producer` user (NATS URL and credentials from the environment).
# A failed call is logged and the loop goes on: nodes may still be starting or restarting.
set -u
interval_s="${PRODUCER_INTERVAL_S:-5}"
n=0
while :; do
    n=$((n + 1))
    faas invoke support '{"message": "Where is my order?"}' --timeout-s 120 \
        || echo "producer: invoke failed" >&2
    # Consumed by `summarize` (triggers=["events.reviews.>"]); its summaries go to
    # faas.results.summarize.
    faas publish events.reviews.posted "{\"text\": \"Review $n: fast delivery, the box was dented.\"}" \
        || echo "producer: publish failed" >&2
    sleep "$interval_s"
done
