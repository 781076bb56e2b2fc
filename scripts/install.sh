#!/usr/bin/env bash
# Installs lbd for production (docs/operations.md). Run as root, or with DESTDIR set:
#
#   $PREFIX (/opt/lbd)              its own venv: lbd and its runtime dependencies only
#   $BINDIR (/usr/local/bin)        lbd, lbctl: symlinks into the venv
#   $UNITDIR (/etc/systemd/system)  lbd.service (the paths in it follow the variables)
#   $SYSCONFDIR (/etc/lbd)          lbd.toml (conf/single.toml, only if there is none),
#                                   examples/, sync.key (generated, 0600, only if none)
#   $STATEDIR (/var/lib/lbd)        created (0750)
#
# With DESTDIR=<dir> every path above is put under <dir> and nothing outside it is touched
# (a staging root for a package). Without it, `systemctl daemon-reload` runs so that systemd
# sees the unit; no service is enabled, started, stopped or disabled, lbd's or any other.
# Safe to run again: the venv is rebuilt beside the old one and swapped in; the config and
# the key are never overwritten. The checkout is not written to (the build runs on a copy).
set -euo pipefail

DESTDIR=${DESTDIR:-}
PREFIX=${PREFIX:-/opt/lbd}
BINDIR=${BINDIR:-/usr/local/bin}
UNITDIR=${UNITDIR:-/etc/systemd/system}
SYSCONFDIR=${SYSCONFDIR:-/etc/lbd}
STATEDIR=${STATEDIR:-/var/lib/lbd}
PYTHON=${PYTHON:-python3}

src=$(cd "$(dirname "$0")/.." && pwd)
say() { printf 'install.sh: %s\n' "$*"; }

for var in PREFIX BINDIR UNITDIR SYSCONFDIR STATEDIR; do
  case ${!var} in
    /*) ;;
    *) say "$var must be an absolute path, got '${!var}'" >&2; exit 2 ;;
  esac
done
if [ -z "$DESTDIR" ] && [ "$(id -u)" -ne 0 ]; then
  say "run as root, or set DESTDIR to install into a staging directory" >&2
  exit 2
fi
case $DESTDIR in
  ""|/*) ;;
  *) DESTDIR=$(pwd)/$DESTDIR ;;
esac

work=$(mktemp -d)
trap 'rm -rf "$work"; rm -rf "${new:-}"' EXIT

# --- the venv --------------------------------------------------------------------------------
# Built at $DESTDIR$PREFIX.new, then given its final paths ($PREFIX, without DESTDIR): pip
# writes the build location into script shebangs, activate scripts and pyvenv.cfg, and
# compileall into the byte code's file names.
venv=$DESTDIR$PREFIX
new=$venv.new
rm -rf "$new"
mkdir -p "$(dirname "$venv")"
"$PYTHON" -m venv "$new"
# A copy of the sources, so that the build leaves no build/ or egg-info in the checkout and
# cannot pick up a stale build/ from it.
tar -C "$src" --exclude=__pycache__ -cf - pyproject.toml lb ha | tar -C "$work" -xf -
"$new/bin/python" -m pip install --quiet --no-compile --disable-pip-version-check "$work"
grep -rlIF -- "$new" "$new/bin" "$new/pyvenv.cfg" | while read -r f; do
  sed -i "s|$new|$PREFIX|g" "$f"
done
"$new/bin/python" -m compileall -f -q -s "$new" -p "$PREFIX" "$new/lib" >/dev/null
install -d -m 0755 "$new/share/doc/lbd"
install -m 0644 "$src/README.md" "$src"/docs/*.md "$new/share/doc/lbd/"
if [ -e "$venv" ]; then
  rm -rf "$venv.old"
  mv "$venv" "$venv.old"
fi
mv "$new" "$venv"
rm -rf "$venv.old"
say "lbd $("$venv/bin/python" -c 'from lb.version import VERSION; print(VERSION)') in $venv"

# --- commands and unit -----------------------------------------------------------------------
install -d -m 0755 "$DESTDIR$BINDIR"
for cmd in lbd lbctl; do
  ln -sfn "$PREFIX/bin/$cmd" "$DESTDIR$BINDIR/$cmd"
done
install -d -m 0755 "$DESTDIR$UNITDIR"
sed -e "s|/usr/local/bin/|$BINDIR/|g" -e "s|/etc/lbd/|$SYSCONFDIR/|g" \
    -e "s|/opt/lbd/|$PREFIX/|g" "$src/systemd/lbd.service" > "$work/lbd.service"
install -m 0644 "$work/lbd.service" "$DESTDIR$UNITDIR/lbd.service"

# --- config, key, state ----------------------------------------------------------------------
etc=$DESTDIR$SYSCONFDIR
install -d -m 0755 "$etc" "$etc/examples"
install -m 0644 "$src"/conf/*.toml "$etc/examples/"
if [ -e "$etc/lbd.toml" ]; then
  say "kept $SYSCONFDIR/lbd.toml"
else
  install -m 0644 "$src/conf/single.toml" "$etc/lbd.toml"
  say "wrote $SYSCONFDIR/lbd.toml (conf/single.toml): edit it, then lbd --check"
fi
if [ -e "$etc/sync.key" ]; then
  say "kept $SYSCONFDIR/sync.key"
else
  (umask 077 && "$venv/bin/python" -c 'import secrets; print(secrets.token_hex(32))' \
     > "$etc/sync.key")
  say "generated $SYSCONFDIR/sync.key (0600): copy this same file to the peer node"
fi
install -d -m 0750 "$DESTDIR$STATEDIR"

if [ -z "$DESTDIR" ] && [ -d /run/systemd/system ]; then
  systemctl daemon-reload
  say "unit $UNITDIR/lbd.service installed; start with: systemctl enable --now lbd"
fi
