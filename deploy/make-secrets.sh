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
# Compose bind-mounts each file into its containers, which run as their own
# user (pushbus: uid 10001): the files are readable, the directory is not
# open to anyone else on the host.
chmod 700 "$dir"
chmod 444 "$dir"/*
echo "secrets in $dir"
