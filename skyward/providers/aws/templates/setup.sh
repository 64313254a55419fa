#!/bin/sh
# Install uv and Python {python} for Skyward; the wrapper {wrapper} waits for this.
# uv is a pinned release, checked against its sha256 before anything runs from it; uv
# checks the Python builds it downloads against the hashes it ships with.
set -eu
mkdir -p {state}
trap '[ -e {state}/ready ] || echo "skyward: instance set-up failed" > {state}/failed' EXIT
export HOME=/root UV_PYTHON_INSTALL_DIR=/opt/skyward/python
case "$(uname -m)" in
  x86_64) url={uv_x86_64_url}; sha256={uv_x86_64_sha256} ;;
  aarch64) url={uv_aarch64_url}; sha256={uv_aarch64_sha256} ;;
  *) echo "skyward: no uv build for $(uname -m)" >&2; exit 1 ;;
esac
download=$(mktemp -d)
curl -fsSL --retry 5 -o "$download/uv.whl" "$url"
echo "$sha256  $download/uv.whl" | sha256sum -c -
python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract(sys.argv[2], sys.argv[3])' \
  "$download/uv.whl" "uv-{uv_version}.data/scripts/uv" "$download"
install -m 0755 "$download/uv-{uv_version}.data/scripts/uv" /usr/local/bin/uv
rm -rf "$download"
/usr/local/bin/uv python install {python}
/usr/local/bin/uv python find {python} > {state}/python
chmod -R a+rX /opt/skyward {state}
touch {state}/ready
/usr/local/sbin/skyward-hostkey
