#!/usr/bin/env python3
"""Make the layer tars and an OCI image layout the rootfs tests read.

usage: make_layers.py OUT_DIR BUSYBOX

OUT_DIR/
  l1.tar.gz  base layer, GNU format: busybox, symlinks, hard links, long
             names/links, fifo, devices, setuid, owners, /etc/passwd+group
  l2.tar     PAX layer: whiteouts, opaque dir, type changes, xattrs, long
             PAX paths, an entry through a symlinked parent, duplicates,
             a cross-layer hard link, a uid above 2^31, nanosecond mtimes
  l2.tar.zst the same layer, zstd
  l3.tar.gz  a multi-member gzip (two members)
  l3.tar     the same, uncompressed
  mislabelled.tar.gz  l2 as zstd under a .gz name
  oci/       an OCI layout (tag "test") of l1.tar.gz, l2.tar, l3.tar.gz for umoci
  hostile/*.tar  crafted bad archives
"""
import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile

out = sys.argv[1]
busybox = sys.argv[2]
os.makedirs(out, exist_ok=True)

MTIME = 1700000000


def info(name, kind=tarfile.REGTYPE, mode=0o644, uid=0, gid=0, mtime=MTIME, **kw):
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.mode = mode
    ti.uid = uid
    ti.gid = gid
    ti.mtime = mtime
    ti.uname = ti.gname = ""
    for k, v in kw.items():
        setattr(ti, k, v)
    return ti


def add(t, name, data=None, **kw):
    ti = info(name, **kw)
    if ti.type == tarfile.REGTYPE:
        data = data or b""
        ti.size = len(data)
        t.addfile(ti, io.BytesIO(data))
    else:
        t.addfile(ti)


def d(t, name, mode=0o755, **kw):
    add(t, name, kind=tarfile.DIRTYPE, mode=mode, **kw)


LONG_DIR = "long/" + "d" * 90 + "/" + "e" * 90
LONG_TARGET = "../" * 3 + "t" * 150

# ---- layer 1: GNU ----
b1 = io.BytesIO()
with tarfile.open(fileobj=b1, mode="w", format=tarfile.GNU_FORMAT) as t:
    for name in ["bin", "etc", "usr", "usr/bin", "dev", "var", "var/empty", "home", "home/app",
                 "opaque", "opaque/sub", "wh", "wh/dir", "replace", "replace/d", "long",
                 "long/" + "d" * 90, LONG_DIR]:
        d(t, name)
    d(t, "tmp", mode=0o1777)
    with open(busybox, "rb") as f:
        add(t, "bin/busybox", f.read(), mode=0o755)
    add(t, "bin/sh", kind=tarfile.SYMTYPE, linkname="busybox", mode=0o777)
    add(t, "bin/ls", kind=tarfile.LNKTYPE, linkname="bin/busybox", mode=0o755)
    add(t, "bin/cat", kind=tarfile.LNKTYPE, linkname="bin/busybox", mode=0o755)
    add(t, "usrlink", kind=tarfile.SYMTYPE, linkname="usr", mode=0o777)
    add(t, "etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n"
        b"daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n"
        b"app:x:1000:1000:App:/home/app:/bin/sh\n"
        b"nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n")
    add(t, "etc/group", b"root:x:0:\nwheel:x:10:app,root\naudio:x:29:app\napp:x:1000:\n"
        b"nogroup:x:65534:\n")
    add(t, "etc/shadow", b"root:*:19000:0:99999:7:::\n", mode=0o640, gid=42)
    add(t, "home/app/owned", b"mine\n", uid=1000, gid=1000, mtime=1234567890)
    add(t, "usr/bin/setuid", b"#!/bin/sh\n", mode=0o4755)
    add(t, "dev/null", kind=tarfile.CHRTYPE, devmajor=1, devminor=3, mode=0o666)
    add(t, "dev/sda", kind=tarfile.BLKTYPE, devmajor=8, devminor=0, mode=0o660, gid=6)
    add(t, "dev/bigminor", kind=tarfile.CHRTYPE, devmajor=300, devminor=70000, mode=0o600)
    add(t, "dev/fifo", kind=tarfile.FIFOTYPE, mode=0o620)
    add(t, LONG_DIR + "/file-with-a-long-path", b"long\n")
    add(t, "long/link", kind=tarfile.SYMTYPE, linkname=LONG_TARGET, mode=0o777)
    add(t, "opaque/a", b"a\n")
    add(t, "opaque/sub/b", b"b\n")
    add(t, "wh/gone", b"gone\n")
    add(t, "wh/keep", b"keep\n")
    add(t, "wh/dir/x", b"x\n")
    add(t, "replace/f", b"file\n")
    add(t, "replace/d/child", b"child\n")
    add(t, "replace/l", kind=tarfile.SYMTYPE, linkname="/etc/passwd", mode=0o777)
    add(t, "dup", b"first\n")
    add(t, "empty", b"")
    add(t, "big", bytes(range(256)) * 4096 * 3 + b"tail")  # 3 MiB + 4 bytes
l1 = b1.getvalue()

def write_raw(name, data):
    with open(os.path.join(out, name), "wb") as f:
        f.write(data)


# ---- layer 2: PAX ----
b2 = io.BytesIO()
with tarfile.open(fileobj=b2, mode="w", format=tarfile.PAX_FORMAT) as t:
    add(t, "wh/.wh.gone")
    add(t, "wh/dir/.wh.x")
    d(t, "opaque")
    add(t, "opaque/.wh..wh..opq")
    add(t, "opaque/new", b"new\n")
    d(t, "replace/f")  # a directory replaces a file
    add(t, "replace/f/inside", b"inside\n")
    add(t, "replace/d", b"now a file\n")  # a file replaces a directory
    add(t, "replace/l", b"no longer a link\n")
    pax_long = "pax/" + "/".join(["p" * 60] * 5) + "/deep"
    add(t, pax_long, b"deep\n")
    ti = info("bin/ping", mode=0o755)
    ti.pax_headers = {
        "SCHILY.xattr.security.capability": "\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00",
        "SCHILY.xattr.user.comment": "pinger",
    }
    ti.size = 5
    t.addfile(ti, io.BytesIO(b"ping\n"))
    # A POSIX ACL as the kernel's VFS xattr (version 2): user::rw- user:1000:r-- group::r-- mask::r-- other::---
    import struct
    acl = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", tag, perm, ident) for tag, perm, ident in
                                          [(1, 6, 0xffffffff), (2, 4, 1000), (4, 4, 0xffffffff),
                                           (0x10, 4, 0xffffffff), (0x20, 0, 0xffffffff)])
    ti = info("acl", mode=0o640)
    ti.pax_headers = {"SCHILY.xattr.system.posix_acl_access": acl.decode("utf-8", "surrogateescape")}
    ti.size = 4
    t.addfile(ti, io.BytesIO(b"acl\n"))
    write_raw("acl.xattr", acl)
    add(t, "usrlink/bin/through-link", b"via symlinked parent\n")
    add(t, "dup", b"second wins\n")
    add(t, "etc/passwd-hardlink", kind=tarfile.LNKTYPE, linkname="etc/passwd")
    ti = info("highuid", uid=3000000000, gid=3000000001)
    ti.size = 3
    t.addfile(ti, io.BytesIO(b"hi\n"))
    ti = info("nanotime")
    ti.pax_headers = {"mtime": "1700000000.123456789"}
    ti.size = 0
    t.addfile(ti, io.BytesIO(b""))
l2 = b2.getvalue()

# ---- layer 3: plain ustar, gzip written as two members ----
b3 = io.BytesIO()
with tarfile.open(fileobj=b3, mode="w", format=tarfile.USTAR_FORMAT) as t:
    add(t, "etc/motd", b"layer three\n")
    add(t, "tmp/.wh.nothing-here")  # a whiteout of something that never existed
l3 = b3.getvalue()


def write(name, data):
    with open(os.path.join(out, name), "wb") as f:
        f.write(data)


def gz(data):
    return gzip.compress(data, mtime=0)


write("l1.tar.gz", gz(l1))
write("l2.tar", l2)
write("l3.tar", l3)
half = len(l3) // 2
write("l3.tar.gz", gz(l3[:half]) + gz(l3[half:]))
subprocess.run(["zstd", "-q", "-f", os.path.join(out, "l2.tar"), "-o", os.path.join(out, "l2.tar.zst")], check=True)
with open(os.path.join(out, "l2.tar.zst"), "rb") as f:
    write("mislabelled.tar.gz", f.read())

# ---- OCI layout for umoci ----
oci = os.path.join(out, "oci")
blobs = os.path.join(oci, "blobs", "sha256")
os.makedirs(blobs, exist_ok=True)


def blob(data):
    h = hashlib.sha256(data).hexdigest()
    with open(os.path.join(blobs, h), "wb") as f:
        f.write(data)
    return "sha256:" + h, len(data)


layers = [(gz(l1), l1, "application/vnd.oci.image.layer.v1.tar+gzip"),
          (l2, l2, "application/vnd.oci.image.layer.v1.tar"),
          (gz(l3[:half]) + gz(l3[half:]), l3, "application/vnd.oci.image.layer.v1.tar+gzip")]
layer_desc = []
for stored, raw, mt in layers:
    dg, size = blob(stored)
    layer_desc.append({"mediaType": mt, "digest": dg, "size": size})
config = {"architecture": "amd64", "os": "linux",
          "config": {"User": "app", "Cmd": ["/bin/sh"]},
          "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(r).hexdigest() for _, r, _ in layers]}}
cdg, csize = blob(json.dumps(config).encode())
manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cdg, "size": csize},
            "layers": layer_desc}
mdg, msize = blob(json.dumps(manifest).encode())
with open(os.path.join(oci, "oci-layout"), "w") as f:
    json.dump({"imageLayoutVersion": "1.0.0"}, f)
with open(os.path.join(oci, "index.json"), "w") as f:
    json.dump({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": mdg, "size": msize,
         "annotations": {"org.opencontainers.image.ref.name": "test"}}]}, f)
write("manifest-digest", mdg.encode())

# ---- hostile archives ----
hostile = os.path.join(out, "hostile")
os.makedirs(hostile, exist_ok=True)
escape_dir = sys.argv[3] if len(sys.argv) > 3 else "/tmp/supermachine-escape-target"


def hostile_tar(name, build, fmt=tarfile.PAX_FORMAT):
    b = io.BytesIO()
    with tarfile.open(fileobj=b, mode="w", format=fmt) as t:
        build(t)
    with open(os.path.join(hostile, name), "wb") as f:
        f.write(b.getvalue())
    return b.getvalue()


hostile_tar("dotdot.tar", lambda t: add(t, "../../escaped", b"x"))
hostile_tar("dotdot_inner.tar", lambda t: (d(t, "a"), add(t, "a/../../escaped", b"x")))
hostile_tar("absolute.tar", lambda t: add(t, "/etc/absolute", b"confined\n"))


def symlink_escape(t):
    add(t, "esc", kind=tarfile.SYMTYPE, linkname="../../../../../.." + escape_dir, mode=0o777)
    add(t, "esc/pwned", b"pwned\n")
    add(t, "abs", kind=tarfile.SYMTYPE, linkname=escape_dir, mode=0o777)
    add(t, "abs/pwned2", b"pwned\n")


hostile_tar("symlink_escape.tar", symlink_escape)
hostile_tar("hardlink_escape.tar", lambda t: add(t, "hl", kind=tarfile.LNKTYPE, linkname="../../../etc/passwd"))
hostile_tar("hardlink_missing.tar", lambda t: add(t, "hl", kind=tarfile.LNKTYPE, linkname="does/not/exist"))
hostile_tar("hardlink_dir.tar", lambda t: (d(t, "dir"), add(t, "hl", kind=tarfile.LNKTYPE, linkname="dir")))
hostile_tar("whiteout_dotdot.tar", lambda t: add(t, "a/.wh..."))
good = hostile_tar("truncated_src.tar", lambda t: add(t, "file", b"z" * 10000))
with open(os.path.join(hostile, "truncated.tar"), "wb") as f:
    f.write(good[:512 + 3000])
with open(os.path.join(hostile, "truncated_header.tar"), "wb") as f:
    f.write(good[:300])
with open(os.path.join(hostile, "no_end_marker.tar"), "wb") as f:
    f.write(good[:512 + 10240])
with open(os.path.join(hostile, "truncated.tar.gz"), "wb") as f:
    f.write(gz(good)[:-20])
bad = bytearray(good)
bad[0] ^= 0x01  # name changes, checksum no longer matches
with open(os.path.join(hostile, "bad_checksum.tar"), "wb") as f:
    f.write(bytes(bad))
# size field claiming 2^62 bytes (base-256)
huge = bytearray(good[:512])
huge[124:136] = b"\x80" + b"\x00" * 3 + (1 << 62).to_bytes(8, "big")
huge[148:156] = b"        "
huge[148:156] = ("%06o\0 " % sum(huge)).encode()
with open(os.path.join(hostile, "huge_size.tar"), "wb") as f:
    f.write(bytes(huge) + b"\0" * 1024)
# PAX header whose record length runs past its block
pax = bytearray(hostile_tar("pax_src.tar", lambda t: t.addfile(
    (lambda ti: (ti.pax_headers.update({"path": "x" * 10}), ti)[1])(info("p")))))
idx = pax.find(b" path=")
pax[idx - 2:idx] = b"99"
with open(os.path.join(hostile, "pax_bad_length.tar"), "wb") as f:
    f.write(bytes(pax))
