#!/bin/sh
# Cargo's rustc wrapper for the workspace's own crates ($1 is rustc, the rest its arguments):
# adds `-C target-feature=+crt-static -C relocation-model=static` when linking the
# `corral-init` binary for a Linux glibc target, so that it is a static, non-PIE executable.
# Everything else is passed through unchanged.
rustc="$1"
shift
static=""
case " $* " in
*" --crate-name corral_init "*" --crate-type bin "*)
    case " $* " in
    *" --target "*) case " $* " in *" --target x86_64-unknown-linux-gnu "* | *" --target aarch64-unknown-linux-gnu "*) static=1 ;; esac ;;
    *) case "$(uname -s)" in Linux) static=1 ;; esac ;;
    esac
    ;;
esac
if [ -n "$static" ]; then
    exec "$rustc" "$@" -C target-feature=+crt-static -C relocation-model=static
fi
exec "$rustc" "$@"
