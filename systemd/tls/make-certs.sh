#!/usr/bin/env bash
# Makes a small private PKI for corrald's TLS listener with openssl: a CA, a server
# certificate for corrald, and client certificates whose subject OU is the client's role.
#
#   make-certs.sh DIR NAME_OR_IP...   the CA (made once, then reused), a server certificate
#                                     for these host names and IP addresses, and two
#                                     clients: operator (OU=admin) and scheduler (OU=read,
#                                     or $SCHEDULER_ROLE)
#   make-certs.sh --client DIR NAME ROLE
#                                     one more client certificate from the CA in DIR;
#                                     ROLE is admin or read
#
# Files in DIR: ca.pem and ca.key (keep the key offline once the certificates are made),
# server.pem/server.key, operator.pem/operator.key, scheduler.pem/scheduler.key. Keys are EC
# P-256 in PKCS#8, readable by their owner only. Certificates are X.509 v3 as rustls/webpki
# require: the CA with basicConstraints CA:TRUE and keyUsage keyCertSign; the server with its
# names in subjectAltName and extendedKeyUsage serverAuth; clients with clientAuth.
#
# Environment: CA_DAYS (default 3650), DAYS for the others (default 397), SCHEDULER_ROLE
# (default read).
set -euo pipefail

usage() {
  sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

command -v openssl >/dev/null || { echo "make-certs.sh: openssl is required" >&2; exit 1; }

CA_DAYS=${CA_DAYS:-3650}
DAYS=${DAYS:-397}
SCHEDULER_ROLE=${SCHEDULER_ROLE:-read}

# The openssl configuration: only what is written here, whatever the system's openssl.cnf says.
conf() {
  cat <<CONF
[req]
distinguished_name = dn
prompt = no
[dn]
[ca]
basicConstraints = critical, CA:TRUE, pathlen:0
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = ${SAN:-DNS:localhost}
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
[client]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
CONF
}

key() { # FILE: a new EC P-256 key in PKCS#8, mode 0600
  (umask 077 && openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null)
}

ca() { # DIR: make the CA unless there is one
  local dir=$1
  if [[ -f $dir/ca.pem && -f $dir/ca.key ]]; then
    echo "using the CA in $dir/ca.pem"
    return
  fi
  key "$dir/ca.key"
  openssl req -new -x509 -sha256 -days "$CA_DAYS" -key "$dir/ca.key" \
    -subj "/O=corral/CN=corral CA" -config <(conf) -extensions ca -out "$dir/ca.pem"
  echo "made the CA: $dir/ca.pem"
}

sign() { # DIR NAME SUBJECT EXTENSIONS: a key and a certificate signed by the CA in DIR
  local dir=$1 name=$2 subject=$3 ext=$4
  key "$dir/$name.key"
  openssl req -new -key "$dir/$name.key" -subj "$subject" -config <(conf) -out "$dir/$name.csr"
  openssl x509 -req -sha256 -days "$DAYS" -in "$dir/$name.csr" \
    -CA "$dir/ca.pem" -CAkey "$dir/ca.key" -set_serial "0x$(openssl rand -hex 16)" \
    -extfile <(conf) -extensions "$ext" -out "$dir/$name.pem" 2>/dev/null
  rm -f "$dir/$name.csr"
  echo "made $dir/$name.pem: $subject"
}

client() { # DIR NAME ROLE
  local dir=$1 name=$2 role=$3
  case $role in
    admin | read) ;;
    *) echo "make-certs.sh: role $role: use admin or read" >&2; exit 2 ;;
  esac
  [[ $name =~ ^[A-Za-z0-9][A-Za-z0-9_.-]*$ ]] || { echo "make-certs.sh: bad client name $name" >&2; exit 2; }
  sign "$dir" "$name" "/O=corral/OU=$role/CN=$name" client
}

if [[ ${1:-} == --client ]]; then
  [[ $# -eq 4 ]] || usage
  dir=$2
  [[ -f $dir/ca.pem && -f $dir/ca.key ]] || { echo "make-certs.sh: no CA in $dir (run without --client first)" >&2; exit 1; }
  client "$dir" "$3" "$4"
  exit 0
fi

[[ $# -ge 2 && ${1:-} != -* ]] || usage
dir=$1
shift
mkdir -p "$dir"

# subjectAltName: IPv4 and IPv6 addresses as IP:, everything else as DNS:.
SAN=
for name in "$@"; do
  if [[ $name =~ ^[0-9]+(\.[0-9]+){3}$ || $name == *:* ]]; then
    SAN+="${SAN:+, }IP:$name"
  elif [[ $name =~ ^[A-Za-z0-9*]([A-Za-z0-9.-]*[A-Za-z0-9])?$ ]]; then
    SAN+="${SAN:+, }DNS:$name"
  else
    echo "make-certs.sh: $name is neither a host name nor an IP address" >&2
    exit 2
  fi
done
export SAN

ca "$dir"
sign "$dir" server "/O=corral/OU=server/CN=$1" server
client "$dir" operator admin
client "$dir" scheduler "$SCHEDULER_ROLE"
