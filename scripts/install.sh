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
# The hot-path modules are compiled by mypyc into the venv's site-packages/lbd-native
# (lb/native.py); lbd uses them while they match the installed source and falls back to pure
# Python otherwise. That needs a C compiler and the Python headers (Debian: gcc python3-dev);
# mypy (which brings mypyc) and setuptools are build tools only: they are installed into a
# throwaway directory for the build and never into the venv. NATIVE=0 installs pure Python.
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
NATIVE=${NATIVE:-1}

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
case $NATIVE in
  0|1) ;;
  *) say "NATIVE must be 1 (compile the hot path, the default) or 0, got '$NATIVE'" >&2; exit 2 ;;
esac
if [ "$NATIVE" = 1 ]; then
  headers=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
  if ! command -v cc >/dev/null || [ ! -e "$headers/Python.h" ]; then
    say "compiling the hot path needs a C compiler and $headers/Python.h" \
        "(Debian: apt-get install gcc python3-dev); or NATIVE=0 for pure Python" >&2
    exit 2
  fi
fi

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
tar -C "$src" --exclude=__pycache__ -cf - pyproject.toml lb ha scripts/build_native.py \
  | tar -C "$work" -xf -
"$new/bin/python" -m pip install --quiet --no-compile --disable-pip-version-check "$work"
if [ "$NATIVE" = 1 ]; then
  # pyproject.toml's "native" extra names the build tools (one place for their versions).
  mapfile -t tools < <("$new/bin/python" -c 'import sys, tomllib
print("\n".join(tomllib.load(open(sys.argv[1], "rb"))["project"]["optional-dependencies"]["native"]))
' "$work/pyproject.toml")
  "$new/bin/python" -m pip install --quiet --disable-pip-version-check --target "$work/tools" \
    "${tools[@]}"
  site=$("$new/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
  PYTHONPATH=$work/tools "$new/bin/python" "$work/scripts/build_native.py" \
    --out "$site/lbd-native" >/dev/null
fi
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
# -I: the installed lbd, not the one in the current directory (a checkout, when run from one).
say "lbd $("$venv/bin/python" -I -c 'from lb.version import VERSION; print(VERSION)') in $venv:" \
    "$("$venv/bin/python" -I -c 'import lb.native; print(lb.native.status().describe())')"

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
