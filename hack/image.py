"""Write a one-layer container image archive without a container daemon (hack/image.sh).

The archive is both an OCI image layout (oci-layout, index.json, blobs/sha256/...) and a
docker-archive (manifest.json naming the same blobs), like `docker save` since Docker 25, so
`docker load`, `skopeo copy`, `podman load` and `ctr images import` all read it.

The layer is described by a spec file, one entry a line:
  copy SRC DEST MODE          a host file at DEST (symlinks followed), owned by root
  file PATH                   a host file at the same path (symlinks followed), mode kept
  tree SRC DEST EXCLUDES      a host directory, recursively; EXCLUDES: comma-separated names
  dir PATH MODE UID           an empty directory
  text PATH MODE CONTENT      a file with CONTENT (\\n for newlines)
Parent directories are added as root-owned 0755. Timestamps are 0 and entries sorted, so the
same inputs give the same digests.
"""

import argparse
import hashlib
import io
import json
import os
import stat
import tarfile


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--spec", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--ref", required=True)
    ap.add_argument("--user", default="0:0")
    ap.add_argument("--entrypoint", required=True)
    ap.add_argument("--env", action="append", default=[])
    ap.add_argument("--label", action="append", default=[])
    ap.add_argument("--expose", default="")
    a = ap.parse_args()

    entries = {}  # path in image (no leading /) -> (kind, data, mode, uid, linkname)

    def parent_dirs(path):
        parts = path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            entries.setdefault(d, ("dir", None, 0o755, 0, None))

    def put(path, entry):
        path = path.strip("/")
        parent_dirs(path)
        entries[path] = entry

    def put_file(src, dest, mode=None):
        with open(src, "rb") as f:
            data = f.read()
        if mode is None:
            mode = stat.S_IMODE(os.stat(src).st_mode)
        put(dest, ("file", data, mode, 0, None))

    with open(a.spec) as spec:
        for line in spec:
            line = line.rstrip("\n")
            if not line:
                continue
            kind, _, rest = line.partition(" ")
            if kind == "copy":
                src, dest, mode = rest.split(" ")
                put_file(src, dest, int(mode, 8))
            elif kind == "file":
                put_file(rest, rest)
            elif kind == "dir":
                path, mode, uid = rest.split(" ")
                put(path, ("dir", None, int(mode, 8), int(uid), None))
            elif kind == "text":
                path, mode, content = rest.split(" ", 2)
                put(path, ("file", content.replace("\\n", "\n").encode(), int(mode, 8), 0, None))
            elif kind == "tree":
                src, dest, excludes = rest.split(" ")
                skip = set(excludes.split(","))
                for dirpath, dirnames, filenames in os.walk(src):
                    dirnames[:] = [d for d in dirnames if d not in skip]
                    rel = os.path.relpath(dirpath, src)
                    base = dest if rel == "." else os.path.join(dest, rel)
                    put(base, ("dir", None, 0o755, 0, None))
                    for name in filenames:
                        p = os.path.join(dirpath, name)
                        if os.path.islink(p):
                            put(os.path.join(base, name), ("link", None, 0o777, 0, os.readlink(p)))
                        else:
                            put_file(p, os.path.join(base, name))
            else:
                raise SystemExit(f"image.py: unknown spec line {line!r}")

    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(entries):
            kind, data, mode, uid, link = entries[path]
            ti = tarfile.TarInfo(path)
            ti.mtime = 0
            ti.mode = mode
            ti.uid = ti.gid = uid
            ti.uname = ti.gname = ""
            if kind == "dir":
                ti.type = tarfile.DIRTYPE
                tar.addfile(ti)
            elif kind == "link":
                ti.type = tarfile.SYMTYPE
                ti.linkname = link
                tar.addfile(ti)
            else:
                ti.size = len(data)
                tar.addfile(ti, io.BytesIO(data))
    layer = layer.getvalue()
    layer_digest = hashlib.sha256(layer).hexdigest()

    env = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"] + a.env
    labels = dict(l.split("=", 1) for l in a.label)
    config = {
        "created": "1970-01-01T00:00:00Z",
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "User": a.user,
            "Env": env,
            "Entrypoint": [a.entrypoint],
            "WorkingDir": "/",
            "Labels": labels or None,
            "ExposedPorts": {f"{p}/tcp": {} for p in a.expose.split(",") if p} or None,
        },
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{layer_digest}"]},
        "history": [{"created_by": "claudekey hack/image.sh"}],
    }
    config["config"] = {k: v for k, v in config["config"].items() if v is not None}
    config_bytes = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
    config_digest = hashlib.sha256(config_bytes).hexdigest()
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": f"sha256:{config_digest}",
            "size": len(config_bytes),
        },
        "layers": [
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar",
                "digest": f"sha256:{layer_digest}",
                "size": len(layer),
            }
        ],
    }
    manifest_bytes = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    manifest_digest = hashlib.sha256(manifest_bytes).hexdigest()
    tag = a.ref.rsplit(":", 1)[1] if ":" in a.ref.rsplit("/", 1)[-1] else "latest"
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": f"sha256:{manifest_digest}",
                "size": len(manifest_bytes),
                "annotations": {
                    "io.containerd.image.name": a.ref,
                    "org.opencontainers.image.ref.name": tag,
                },
            }
        ],
    }
    docker_manifest = [
        {
            "Config": f"blobs/sha256/{config_digest}",
            "RepoTags": [a.ref],
            "Layers": [f"blobs/sha256/{layer_digest}"],
        }
    ]

    tmp = a.out + ".tmp"
    with tarfile.open(tmp, mode="w", format=tarfile.PAX_FORMAT) as out:

        def add(name, data, mode=0o644, typ=tarfile.REGTYPE):
            ti = tarfile.TarInfo(name)
            ti.mtime = 0
            ti.mode = mode
            ti.type = typ
            if typ == tarfile.REGTYPE:
                ti.size = len(data)
                out.addfile(ti, io.BytesIO(data))
            else:
                out.addfile(ti)

        add("blobs", None, 0o755, tarfile.DIRTYPE)
        add("blobs/sha256", None, 0o755, tarfile.DIRTYPE)
        add(f"blobs/sha256/{layer_digest}", layer)
        add(f"blobs/sha256/{config_digest}", config_bytes)
        add(f"blobs/sha256/{manifest_digest}", manifest_bytes)
        add("oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        add("index.json", json.dumps(index, separators=(",", ":")).encode())
        add("manifest.json", json.dumps(docker_manifest, separators=(",", ":")).encode())
    os.replace(tmp, a.out)
    print(f"{a.out}: {a.ref} sha256:{manifest_digest} ({len(layer) // 1024} KiB layer)")


if __name__ == "__main__":
    main()
