#!/usr/bin/env bash
# Packs one program as a single-layer OCI image archive, for a container
# runtime to import (`ctr images import`) where no registry can be reached.
#
#   e2e/cluster/oci-image.sh OUT.tar NAME PROGRAM
#
# NAME is the image reference the runtime will know it by (e.g.
# docker.io/sandfork/agent:0.1.0). The image holds PROGRAM at /NAME-OF-PROGRAM
# (stripped of debug info), the shared libraries it links to, an empty /tmp
# (mode 1777), and nothing else; its entrypoint is the program. Files are
# owned by root and world-readable, with fixed times, so the same program
# gives the same image.
set -euo pipefail

[[ $# -eq 3 ]] || { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
out=$1 name=$2 program=$3
[[ -f $program && -x $program ]] || { echo "oci-image: $program is not an executable file" >&2; exit 1; }

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
rootfs="$work/rootfs"
mkdir -p "$rootfs/tmp" "$work/image/blobs/sha256"
chmod 1777 "$rootfs/tmp"

base="$(basename "$program")"
# (A file objcopy does not know, such as a flat guest binary, goes in as it is.)
if ! command -v objcopy >/dev/null || ! objcopy --strip-debug "$program" "$rootfs/$base" 2>/dev/null; then
  cp "$program" "$rootfs/$base"
fi
chmod 0755 "$rootfs/$base"

# The dynamic loader and libraries, at the paths the program was linked against.
while read -r lib; do
  [[ -n $lib ]] || continue
  mkdir -p "$rootfs$(dirname "$lib")"
  cp -L "$lib" "$rootfs$lib"
  chmod 0755 "$rootfs$lib"
done < <(ldd "$program" 2>/dev/null | grep -oE '/[^ ]+' | sort -u || true)

blob() { # FILE MEDIATYPE -> stores FILE as a blob, prints its descriptor
  local digest size
  digest="$(sha256sum "$1" | cut -d' ' -f1)"
  size="$(stat -c %s "$1")"
  cp "$1" "$work/image/blobs/sha256/$digest"
  printf '{"mediaType":"%s","digest":"sha256:%s","size":%s}' "$2" "$digest" "$size"
}

tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -C "$rootfs" -cf "$work/layer.tar" .
diff_id="sha256:$(sha256sum "$work/layer.tar" | cut -d' ' -f1)"
layer="$(blob "$work/layer.tar" application/vnd.oci.image.layer.v1.tar)"

cat >"$work/config.json" <<EOF
{"architecture":"amd64","os":"linux","created":"1970-01-01T00:00:00Z",
 "config":{"Entrypoint":["/$base"],"Env":["PATH=/"],"WorkingDir":"/"},
 "rootfs":{"type":"layers","diff_ids":["$diff_id"]},
 "history":[{"created":"1970-01-01T00:00:00Z","created_by":"e2e/cluster/oci-image.sh $base"}]}
EOF
config="$(blob "$work/config.json" application/vnd.oci.image.config.v1+json)"

printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":%s,"layers":[%s]}' \
  "$config" "$layer" >"$work/manifest.json"
manifest="$(blob "$work/manifest.json" application/vnd.oci.image.manifest.v1+json)"

printf '{"schemaVersion":2,"manifests":[%s]}' \
  "${manifest%\}},\"platform\":{\"architecture\":\"amd64\",\"os\":\"linux\"},\"annotations\":{\"io.containerd.image.name\":\"$name\",\"org.opencontainers.image.ref.name\":\"${name##*:}\"}}" \
  >"$work/image/index.json"
echo '{"imageLayoutVersion":"1.0.0"}' >"$work/image/oci-layout"

tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -C "$work/image" -cf "$out.tmp" .
mv -f "$out.tmp" "$out"
