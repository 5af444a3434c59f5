#!/bin/sh
# Creates deploy/secrets/: one random password per NATS user and the GitLab
# shell secret, for docker-compose.yml. Never commit them (.gitignore).
set -eu
dir="$(dirname "$0")/secrets"
mkdir -p "$dir"
umask 077
for name in hook-ingest filter gitops-notifier replication-lag geo-2 admin gitlab-shell-secret; do
  f="$dir/$name"
  [ -s "$f" ] || head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$f"
done
echo "secrets in $dir"
