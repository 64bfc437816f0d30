#!/usr/bin/env bash
# Make a small OCI image (an image layout on disk) from Debian's
# busybox-static, with umoci: the demo image for the README's main job and
# for tests, since this machine reaches no public registry.
#   scripts/make-demo-image.sh DIR [TAG]   -> use as oci:DIR:TAG
set -euo pipefail
dir=${1:?usage: make-demo-image.sh DIR [TAG]}
tag=${2:-busybox}
busybox=/bin/busybox
[ -x "$busybox" ] || { echo "make-demo-image: $busybox missing (apt-get install busybox-static)" >&2; exit 1; }
if [ -f "$dir/index.json" ] && umoci stat --image "$dir:$tag" >/dev/null 2>&1; then
  exit 0 # already made
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
[ -f "$dir/oci-layout" ] || umoci init --layout "$dir"
umoci new --image "$dir:$tag"
umoci unpack --rootless --image "$dir:$tag" "$work/bundle" >/dev/null
root="$work/bundle/rootfs"
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,etc,tmp,root,home,var/www,proc,sys,dev,run}
chmod 1777 "$root/tmp"
cp "$busybox" "$root/bin/busybox"
for applet in $("$busybox" --list-full); do
  [ -e "$root/$applet" ] || ln -s /bin/busybox "$root/$applet"
done
cat > "$root/etc/passwd" <<'P'
root:x:0:0:root:/root:/bin/sh
www-data:x:33:33:www-data:/var/www:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
P
cat > "$root/etc/group" <<'G'
root:x:0:
www-data:x:33:
users:x:100:www-data
nogroup:x:65534:
G
cat > "$root/etc/os-release" <<'O'
NAME="supermachine demo (busybox)"
ID=busybox
PRETTY_NAME="supermachine demo image (Debian busybox-static)"
O
echo '<h1>hello from a supermachine microVM</h1>' > "$root/var/www/index.html"
umoci repack --image "$dir:$tag" "$work/bundle" >/dev/null
umoci config --image "$dir:$tag" --config.cmd /bin/sh --config.workingdir / \
  --config.env PATH=/usr/sbin:/usr/bin:/sbin:/bin --config.exposedports 80/tcp >/dev/null
umoci gc --layout "$dir"
