"""What a file is, judged from its first bytes, for error messages about files given in the wrong place.

Without this, a JPEG or a config.yaml passed as weights reaches ``torch.load``, whose unpickler rejects it with
the same words it uses for a malicious pickle.
"""

from __future__ import annotations

import os
import re
import zipfile

# The kinds that can hold weights; ``describe_file`` returns one of these for them.
TORCH_ZIP = "a torch checkpoint (zip)"
PICKLE = "a pickle"
SAFETENSORS = "a safetensors file"

_MAGIC = (
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"GIF87a", "a GIF image"),
    (b"GIF89a", "a GIF image"),
)


def describe_file(path: str | os.PathLike) -> str | None:
    """What `path` holds: "a JPEG image", "a YAML text file (a config?)", "an empty file", ..., or one of the
    weights kinds TORCH_ZIP, PICKLE, SAFETENSORS; None when the first bytes match nothing known."""
    with open(path, "rb") as handle:
        head = handle.read(4096)
    if not head:
        return "an empty file"
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            return kind
    if head.startswith(b"PK\x03\x04"):
        return _describe_zip(path)
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):  # PROTO: torch's legacy format
        return PICKLE
    # safetensors: an 8-byte little-endian header length, then the JSON header itself.
    if len(head) > 8 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < os.path.getsize(path):
        return SAFETENSORS
    return _describe_text(head)


def _describe_zip(path: str | os.PathLike) -> str:
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except zipfile.BadZipFile:  # the central directory sits at the end: a file cut short loses it first
        return "a truncated or corrupt zip archive (a checkpoint cut short while copying or saving?)"
    if any(name.endswith("/data.pkl") for name in names):
        return TORCH_ZIP
    return f"a zip archive that is not a torch checkpoint (it holds {', '.join(names[:3]) or 'nothing'})"


def _describe_text(head: bytes) -> str | None:
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as error:
        if error.start < len(head) - 3:  # not a multi-byte character cut by the 4096-byte read: binary
            return None
        text = head[:error.start].decode("utf-8")
    if "\x00" in text:
        return None
    if text.lstrip().startswith(("{", "[")):
        return "a JSON text file"
    if re.search(r"^[\w.-]+:(\s|$)", text, re.MULTILINE):
        return "a YAML text file (a config?)"
    return "a text file"
