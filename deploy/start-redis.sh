#!/bin/sh
# start-redis.sh TEMPLATE [ARG...]: redis-server on a writable copy of TEMPLATE.
#
# Sentinel rewrites the config files of the sentinels (the current primary, the epochs, the
# other sentinels, its own id) and of the data nodes (REPLICAOF + CONFIG REWRITE after a
# failover). So each container runs on its own copy in its /data volume, made from the
# read-only template under /etc/alc on the first start only: a restarted node comes back in
# the role Sentinel last gave it, not the one in the template. (Edits to a template reach
# a node whose volume already holds a copy only after `docker compose down -v`, or by
# CONFIG SET + CONFIG REWRITE on that node.)
#
# Runs the image's own entrypoint, which hands /data to the redis user and drops root.
set -eu
template=$1
shift
conf=/data/$(basename "$template")
[ -f "$conf" ] || cp "$template" "$conf"
exec docker-entrypoint.sh redis-server "$conf" "$@"
