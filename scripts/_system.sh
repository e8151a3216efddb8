# Sourced by the scripts: `need_command CMD PACKAGE` installs the Debian/Ubuntu PACKAGE when CMD
# is missing (as root, or through sudo), or stops with a message saying what to install.
need_command() {
  local cmd="$1" package="$2" sudo_cmd=""
  command -v "$cmd" >/dev/null 2>&1 && return 0
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "$cmd is needed and was not found: install $package with your package manager" >&2
    exit 1
  fi
  if [ "$(id -u)" -ne 0 ]; then
    sudo_cmd="sudo -n"  # no terminal to ask a password on: fail rather than wait
    [ -t 0 ] && sudo_cmd="sudo"
  fi
  echo "installing $package (for $cmd)..." >&2
  if ! { $sudo_cmd env DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
         $sudo_cmd env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
             --no-install-recommends "$package" >/dev/null; } ||
     ! command -v "$cmd" >/dev/null 2>&1; then
    echo "could not install $package: install it (it provides $cmd) and run again" >&2
    exit 1
  fi
}
