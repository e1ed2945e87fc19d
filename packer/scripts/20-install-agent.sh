#!/bin/sh
# Provisioner 20: install the agent offline from the wheelhouse uploaded to
# /tmp/bootsecrets/wheelhouse (built by scripts/build-wheelhouse: pinned, hashed, binary wheels).
# No index, no compiler: pip may only use those files, and every dependency must match the
# sha256 in requirements.lock.
set -eu
src=/tmp/bootsecrets/wheelhouse
venv=/opt/bootsecrets

test -f "$src/requirements.lock" || { echo "20-install-agent: no wheelhouse at $src (did the file provisioner run? scripts/build-wheelhouse)" >&2; exit 1; }
(cd "$src" && sha256sum --check --quiet --strict SHA256SUMS)

# Nothing from the build host's or the droplet's pip configuration may redirect this.
export PIP_CONFIG_FILE=/dev/null PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1

rm -rf "$venv"
# --system-site-packages: Debian's python3-systemd must be importable.
python3 -m venv --system-site-packages "$venv"
# --ignore-installed: Debian's python3-requests/-yaml/-jinja2 (cloud-init's) must not satisfy
# our pins; the venv gets exactly the locked versions.
"$venv/bin/pip" install --no-index --find-links "$src" --only-binary=:all: \
    --require-hashes --no-deps --ignore-installed -r "$src/requirements.lock"
"$venv/bin/pip" install --no-index --no-deps "$src"/bootsecrets-*.whl

install -d -m 0755 /usr/local/sbin
ln -sfn "$venv/bin/bootsecrets" /usr/local/sbin/bootsecrets

# Smoke test: the venv's own pinned modules, Debian's systemd bindings, the entry point.
"$venv/bin/python" - <<'PY'
import importlib.metadata as md, pathlib, sys
venv = pathlib.Path(sys.prefix)
for dist in ("hvac", "requests", "urllib3", "jinja2", "PyYAML", "bootsecrets"):
    location = pathlib.Path(md.distribution(dist).locate_file(""))
    assert venv in location.parents or location == venv, f"{dist} not from the venv: {location}"
import systemd.journal  # noqa: F401
import bootsecrets
print(f"20-install-agent: bootsecrets {bootsecrets.__version__} in {venv}")
PY
/usr/local/sbin/bootsecrets --help >/dev/null
