#!/bin/sh
# A private CA and a server certificate for the broker's TLS listener (8883).
#   sh config/mosquitto/make-certs.sh [DIR] [HOSTNAME ...]
# DIR defaults to config/mosquitto/certs (mounted at /mosquitto/certs by
# docker-compose.yml); the names default to localhost. Writes ca.crt (give it to
# every car and to the gateway: mqtt.ca_file), ca.key (keep it offline),
# server.crt and server.key (the broker's). Existing files are never overwritten.
# A certificate from a public CA works as well: put it in DIR under these names.
set -eu
dir=${1:-$(dirname "$0")/certs}
[ $# -gt 0 ] && shift
[ $# -gt 0 ] || set -- localhost
for f in ca.crt ca.key server.crt server.key; do
  if [ -e "$dir/$f" ]; then echo "make-certs: $dir/$f exists; remove it first to make a new one" >&2; exit 1; fi
done
mkdir -p "$dir"
san=""
for name in "$@"; do
  case $name in
    *[!0-9.]*) san="$san,DNS:$name" ;;
    *) san="$san,IP:$name" ;;
  esac
done
san=${san#,}
umask 077
openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=fleet broker CA" \
  -keyout "$dir/ca.key" -out "$dir/ca.crt" 2>/dev/null
openssl req -newkey rsa:2048 -nodes -subj "/CN=$1" -keyout "$dir/server.key" -out "$dir/server.csr" 2>/dev/null
printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth\n' "$san" > "$dir/server.ext"
openssl x509 -req -in "$dir/server.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" -CAcreateserial \
  -days 825 -extfile "$dir/server.ext" -out "$dir/server.crt" 2>/dev/null
rm -f "$dir/server.csr" "$dir/server.ext" "$dir/ca.srl"
chmod 644 "$dir/ca.crt" "$dir/server.crt"
# server.key and ca.key stay 0600: Mosquitto loads the key as root, before it
# drops to its own user.
echo "make-certs: wrote $dir/ca.crt, ca.key, server.crt, server.key for $san" >&2
