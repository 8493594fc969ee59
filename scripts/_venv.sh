# Shared by scripts/quickstart and scripts/test: make sure ./.venv exists (Python 3.11+).
# Sourced, not run.
if [ ! -x .venv/bin/python ]; then
    if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
        echo "pymaild needs Python 3.11 or newer (python3 is $(python3 --version 2>&1))" >&2
        exit 1
    fi
    if ! python3 -m venv .venv 2>/dev/null; then
        # Debian ships venv support in a separate package.
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv >/dev/null
            rm -rf .venv
            python3 -m venv .venv
        else
            echo "python3 -m venv failed: install Debian's python3-venv (apt-get install python3-venv)" >&2
            exit 1
        fi
    fi
fi
# twistd finds its plugins through a cache; write it now, not on the first start.
regenerate_plugin_cache() {
    .venv/bin/python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"
}
