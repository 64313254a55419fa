#!/bin/sh
# Install uv and Python {python} for Skyward; the wrapper {wrapper} waits for this.
set -eu
mkdir -p {state}
trap '[ -e {state}/ready ] || echo "skyward: instance set-up failed" > {state}/failed' EXIT
export HOME=/root UV_PYTHON_INSTALL_DIR=/opt/skyward/python
curl -LsSf https://astral.sh/uv/install.sh | env UV_INSTALL_DIR=/usr/local/bin UV_NO_MODIFY_PATH=1 sh
/usr/local/bin/uv python install {python}
/usr/local/bin/uv python find {python} > {state}/python
chmod -R a+rX /opt/skyward {state}
touch {state}/ready
