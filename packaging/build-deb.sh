#!/usr/bin/env bash
# Builds the Debian package corral_<version>-<revision>_<arch>.deb (corrald, corral,
# corral-init, the systemd unit, sysusers and tmpfiles snippets, /etc/corral/corrald.toml,
# man pages and bash/zsh/fish completions) and prints its path on the last line.
#
#   packaging/build-deb.sh            # needs cargo-deb: cargo install --locked cargo-deb
#
# The package's contents and maintainer scripts are declared in agent/Cargo.toml
# ([package.metadata.deb]) and packaging/debian/. The man pages, completions and the Debian
# changelog are generated here, from the binaries just built, into packaging/generated.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo-deb >/dev/null 2>&1; then
  echo "build-deb.sh: cargo-deb is missing; install it with: cargo install --locked cargo-deb" >&2
  exit 1
fi

cargo build --release --locked -p corral-agent -p corral-cli
target_dir=$(cargo metadata --format-version 1 --no-deps --locked |
  sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
release="$target_dir/release"

docs=packaging/generated
rm -rf "$docs"
mkdir -p "$docs"
"$release/corrald" --generate-docs "$docs"
"$release/corral" --generate-docs "$docs"

# The package's version is the binaries' own; the date is the commit's, so that rebuilding the
# same commit gives the same package (cargo-deb honours SOURCE_DATE_EPOCH too).
version=$("$release/corrald" --version | awk '{print $2}')
maintainer=$(sed -n 's/^maintainer = "\(.*\)"$/\1/p' agent/Cargo.toml)
if commit=$(git rev-parse --short=12 HEAD 2>/dev/null); then
  export SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct)}"
  from="commit $commit"
else
  export SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH:-$(date +%s)}"
  from="a source tree without git history"
fi
cat >"$docs/changelog" <<CHANGELOG
corral ($version-1) unstable; urgency=medium

  * Built from $from.

 -- $maintainer  $(date -u -R -d "@$SOURCE_DATE_EPOCH")
CHANGELOG

deb=$(cargo deb -p corral-agent --no-build --output "$target_dir/debian/" | tail -n 1)
echo "$deb"
