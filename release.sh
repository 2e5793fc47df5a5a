#!/usr/bin/env bash
# Builds the release binaries of broker and their SHA256SUMS.
#
#   ./release.sh [VERSION [GOOS/GOARCH ...]]
#
# VERSION defaults to `git describe --tags --always --dirty`; the targets default to
# linux/amd64 linux/arm64 darwin/arm64 windows/amd64. Each binary is static (no cgo),
# built with -trimpath and without symbol tables, prints `broker VERSION` for
# --version, and is named broker-VERSION-GOOS-GOARCH (.exe on Windows). They go to the
# folder $OUT (default: dist/ in the repository; a relative OUT is taken from the current
# directory), with SHA256SUMS covering the binaries of this run: `sha256sum -c SHA256SUMS`
# checks them. Publish the binaries and SHA256SUMS.
#
# For the container image (Containerfile), a run with a linux target also stages in
# $OUT/container/ what the image needs besides the binary: the build host's CA roots
# (for ACME; set CA_BUNDLE to use another PEM file) and an empty folder for /data.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
out=${OUT:-$root/dist}
[[ $out == /* ]] || out=$PWD/$out

if [[ ${1:-} == -h || ${1:-} == --help ]]; then
  sed -n '2,/^set -/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'
  exit 0
elif (($# > 0)); then
  version=$1
  shift
else
  version=$(git -C "$root" describe --tags --always --dirty 2>/dev/null) ||
    { echo "release.sh: no version given and git describe failed: ./release.sh v1.2.3" >&2; exit 2; }
fi
# The version ends up in file names, in -ldflags (which splits at spaces) and in image tags.
if [[ ! $version =~ ^[0-9A-Za-z][0-9A-Za-z._-]{0,127}$ ]]; then
  echo "release.sh: bad version '$version': letters, digits and . _ - only, e.g. v1.2.3" >&2
  exit 2
fi
targets=("$@")
((${#targets[@]})) || targets=(linux/amd64 linux/arm64 darwin/arm64 windows/amd64)
for t in "${targets[@]}"; do
  if [[ ! $t =~ ^[a-z0-9]+/[a-z0-9]+$ ]]; then
    echo "release.sh: bad target '$t': GOOS/GOARCH, e.g. linux/amd64 (go tool dist list)" >&2
    exit 2
  fi
done
command -v go >/dev/null || { echo "release.sh: go is not on PATH" >&2; exit 2; }

mkdir -p "$out"
files=()
linux=false
for t in "${targets[@]}"; do
  goos=${t%/*} goarch=${t#*/}
  name=broker-$version-$goos-$goarch
  [[ $goos == windows ]] && name+=.exe
  [[ $goos == linux ]] && linux=true
  echo "release.sh: building $name" >&2
  (cd "$root" && CGO_ENABLED=0 GOOS=$goos GOARCH=$goarch \
    go build -trimpath -ldflags "-s -w -X main.version=$version" -o "$out/$name" .)
  files+=("$name")
done

if command -v sha256sum >/dev/null; then
  sha256=(sha256sum --)
else
  sha256=(shasum -a 256 --) # macOS; the same output format
fi
(cd "$out" && "${sha256[@]}" "${files[@]}" >SHA256SUMS.tmp && mv SHA256SUMS.tmp SHA256SUMS)
cat "$out/SHA256SUMS"

if $linux; then
  ca=${CA_BUNDLE:-}
  if [[ -z $ca ]]; then
    # Debian, Ubuntu, Alpine, Arch; Fedora, RHEL; macOS
    for f in /etc/ssl/certs/ca-certificates.crt /etc/pki/tls/certs/ca-bundle.crt /etc/ssl/cert.pem; do
      if [[ -s $f ]]; then ca=$f; break; fi
    done
  fi
  mkdir -p "$out/container/data"
  if [[ -n $ca && -s $ca ]]; then
    cp "$ca" "$out/container/ca-certificates.crt.tmp"
    chmod 0644 "$out/container/ca-certificates.crt.tmp"
    mv "$out/container/ca-certificates.crt.tmp" "$out/container/ca-certificates.crt"
  else
    echo "release.sh: warning: no CA roots found (set CA_BUNDLE to a PEM file): the container image cannot be built" >&2
  fi
  if [[ $out == "$root/dist" ]]; then
    args=(--build-arg "VERSION=$version")
    # The repository's address for the image's source label, without any credentials in it.
    if src=$(git -C "$root" remote get-url origin 2>/dev/null); then
      src=$(sed -E -e 's#^([a-z+]+://)[^/@]*@#\1#' -e 's#^[^/@:]+@([^:/]+):#https://\1/#' -e 's#\.git$##' <<<"$src")
      args+=(--build-arg "SOURCE=$src")
    fi
    echo "release.sh: build the image with: podman build ${args[*]} -t broker:$version -f Containerfile ." >&2
  fi
fi
