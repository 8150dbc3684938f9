# Sourced by test.sh: the programs the tests run beside libmesh that are not Python packages —
# nginx and curl, the non-Python programs that join the mesh through libmesh-proxy. Installed
# from Debian's packages when missing (as root, without starting any service).
missing=()
command -v curl >/dev/null 2>&1 || missing+=(curl)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx-light)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "the tests need ${missing[*]}: sudo apt-get install ${missing[*]}" >&2
    exit 1
  fi
  echo "installing ${missing[*]} (Debian packages the tests run) ..." >&2
  # a package's service must not start: the tests start their own nginx on free ports
  no_services=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    no_services=1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q --no-install-recommends "${missing[@]}" >&2 ||
    { apt-get update -q >&2 && apt-get install -y -q --no-install-recommends "${missing[@]}" >&2; }
  if [ "$no_services" = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi
fi
