"""Is a folder on a file system that other nodes of a job can see?

A multi-node job whose run folder is on a node-local disk (/tmp, a local ext4 or xfs, a tmpfs) "works" until
a resume: each node writes or reads its own copy, or rank 0's checkpoint is missing on the others. We cannot
prove that a folder is shared, but the file system type in /proc/mounts tells local ones apart.
"""

from __future__ import annotations

import re
from pathlib import Path

# File systems that are shared across machines. FUSE mounts (sshfs, gcsfuse, juicefs, ...) are counted as
# shared: they are almost always network-backed, and a false warning is worse than a missed one here.
NETWORK_FS_TYPES = frozenset({
    "nfs", "nfs4", "lustre", "gpfs", "beegfs", "cifs", "smb3", "smbfs", "ceph", "glusterfs", "wekafs", "panfs",
    "afs", "orangefs", "pvfs2", "ocfs2", "gfs2", "9p", "davfs", "cvmfs", "quobyte", "vast", "vastnfs",
})


def _unescape(field: str) -> str:
    # /proc/mounts writes spaces, tabs, newlines and backslashes in paths as octal escapes (\040 ...).
    return re.sub(r"\\([0-7]{3})", lambda match: chr(int(match.group(1), 8)), field)


def mount_of(path: str | Path, mounts_file: str | Path = "/proc/mounts") -> tuple[str, str] | None:
    """(mount point, file system type) of the mount holding ``path``, or None where /proc/mounts is missing."""
    try:
        lines = Path(mounts_file).read_text().splitlines()
    except OSError:
        return None  # not Linux: nothing to check
    target = Path(path).expanduser().resolve()  # resolves symlinks, works for paths not created yet
    best: tuple[str, str] | None = None
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        mount_point, fs_type = _unescape(fields[1]), fields[2]
        if target == Path(mount_point) or Path(mount_point) in target.parents:
            # The longest matching mount point wins; on ties the later line (the one mounted on top) wins.
            if best is None or len(mount_point) >= len(best[0]):
                best = (mount_point, fs_type)
    return best


def is_shared(fs_type: str) -> bool:
    return fs_type in NETWORK_FS_TYPES or fs_type.startswith("fuse.") or fs_type == "fuse"


def shared_fs_warning(path: str | Path, nodes: int, mounts_file: str | Path = "/proc/mounts") -> str | None:
    """A warning when a job on several nodes would write to a node-local folder; None when all is well."""
    if nodes <= 1:
        return None
    mount = mount_of(path, mounts_file)
    if mount is None or is_shared(mount[1]):
        return None
    mount_point, fs_type = mount
    return (
        f"the run folder {path} is on a local {fs_type} file system (mounted at {mount_point}), but the job "
        f"spans {nodes} nodes: the other nodes will not see its checkpoints, so a requeued job cannot resume. "
        "Set output.root to a folder on a shared file system (NFS, Lustre, GPFS, ...)."
    )
