"""The artifact manifest's schema and its digest: every field the readers rely on is checked here, so a
removed or retyped field is one clear ``ArtifactError`` naming the field and the file, never a KeyError.

Format version 3 (current): the factors are shards listed by ``factors.index.json`` (armor_export.artifact),
and the optional ``groups`` (fused projections: fused fqn -> ``members``, the member linears in stacking order,
and ``split``, their d_out) with the per-layer ``fused_group``; the members of a group are stored as ordinary
layers that hold the same B_blocks, so a reader that ignores ``groups`` still runs the model. ``fuse`` records
the --fuse setting. Everything else as version 2.
Format version 2: ``files`` lists the sha256 of every file of the artifact (tensors, config,
tokenizer, templates) and ``manifest.sha256`` (``sha256sum -c`` format) holds the manifest's own digest.
Version 1 (read, with a note): ``files`` covers only the two tensor files and there is no digest.

Required in every version: format, format_version, method, layers (each with shape, block_size,
has_bias), files and model_files. The provenance fields (source, solver_config,
calibration, targets, ignore, timing, execution, versions) and the solver's per-layer facts are
optional for the readers, but typed: a present field of the wrong type is an error as well.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

FORMAT = "armor-export/factors"
FORMAT_VERSION = 3
READS = (1, 2, 3)
DIGEST = "manifest.sha256"

_NUM = (int, float)
_OPT_NUM = (int, float, type(None))
# field -> (accepted types, required)
TOP = {
    "format": (str, True), "format_version": (int, True), "method": (str, True), "layers": (dict, True),
    "files": (dict, True), "model_files": (list, True),
    "created_unix": (int, False), "source": (dict, False), "solver_config": (dict, False),
    "calibration": ((dict, type(None)), False), "targets": (list, False), "ignore": (list, False),
    "timing_seconds": (dict, False), "execution": (dict, False), "library_versions": (dict, False),
    "fuse": (list, False), "groups": (dict, False),
}
SOURCE = {"model_id": str, "folder": str, "model_type": str, "family": str}
LAYER = {
    "shape": (list, True), "block_size": ((int, type(None)), True), "has_bias": (bool, True),
    "method": (str, False), "loss_start": (_OPT_NUM, False), "loss_final": (_OPT_NUM, False),
    "iterations": (int, False), "seconds": (_NUM, False), "early_stopped": (bool, False),
    "status": (str, False), "notes": (dict, False), "calib_tokens": (int, False), "dropped_tokens": (int, False),
    "fused_group": (str, False),
}


class ArtifactError(ValueError):
    """An artifact that cannot be read: wrong format or version, missing, malformed or corrupt file."""


def digest_line(manifest_bytes: bytes, name: str = "manifest.json") -> str:
    return f"{hashlib.sha256(manifest_bytes).hexdigest()}  {name}\n"


def check_digest(mf: Path, data: bytes, required: bool) -> None:
    side = mf.parent / DIGEST
    if not side.is_file():
        if required:
            raise ArtifactError(f"{side}: missing (format version 2 artifacts carry their manifest's digest); "
                                f"the artifact is incomplete: re-create it")
        return
    m = re.match(r"([0-9a-f]{64}) [ *]manifest\.json\s*$", side.read_text(encoding="utf-8", errors="replace"))
    if not m:
        raise ArtifactError(f"{side}: not '<sha256>  manifest.json'; the digest file is corrupt: re-create the "
                            f"artifact")
    if hashlib.sha256(data).hexdigest() != m.group(1):
        raise ArtifactError(f"{mf}: sha256 does not match {DIGEST}; the manifest is corrupt or was edited: "
                            f"re-create the artifact")


def _tname(t) -> str:
    ts = t if isinstance(t, tuple) else (t,)
    names = {int: "an integer", float: "a number", str: "a string", bool: "true/false", dict: "an object",
             list: "a list", type(None): "null"}
    return " or ".join(dict.fromkeys(names[x] for x in ts if not (x is float and int in ts)))


def _typed(value, types) -> bool:
    ts = types if isinstance(types, tuple) else (types,)
    if isinstance(value, bool) and bool not in ts:
        return False  # JSON true is not an integer here
    return isinstance(value, ts)


def _field(mf: Path, path: str, value, types) -> None:
    if not _typed(value, types):
        raise ArtifactError(f"{mf}: field '{path}' must be {_tname(types)}, found {type(value).__name__} "
                            f"{str(value)[:40]!r}; the manifest is malformed: re-create the artifact")


def _fields(mf: Path, doc: dict, spec: dict, prefix: str = "") -> None:
    for key, (types, required) in spec.items():
        if key not in doc:
            if required:
                raise ArtifactError(f"{mf}: required field '{prefix}{key}' is missing; the manifest is "
                                    f"malformed: re-create the artifact")
            continue
        _field(mf, prefix + key, doc[key], types)


def check_version(mf: Path, version) -> None:
    if version is None:
        raise ArtifactError(f"{mf}: required field 'format_version' is missing; the manifest is malformed: "
                            f"re-create the artifact")
    if isinstance(version, str):
        raise ArtifactError(f"{mf}: field 'format_version' is the string {version!r}; it must be the integer "
                            f"{FORMAT_VERSION} (the manifest was edited by hand or by another tool)")
    if not _typed(version, int) or version not in READS:
        newer = _typed(version, int) and version > FORMAT_VERSION
        hint = "upgrade armor-export" if newer else "re-create the artifact with this version"
        raise ArtifactError(f"{mf}: format version {version!r} is not supported (this armor-export reads versions "
                            f"{', '.join(map(str, READS))}); {hint}")


def validate(mf: Path, man) -> None:
    """Raise ``ArtifactError`` naming ``mf`` and the field for any missing required or mistyped field."""
    if not isinstance(man, dict):
        raise ArtifactError(f"{mf}: must be a JSON object, found {type(man).__name__}")
    if man.get("format") != FORMAT:
        what = "is missing" if "format" not in man else f"is {man['format']!r}"
        raise ArtifactError(f"{mf}: field 'format' {what}, not {FORMAT!r}; this is not an armor-export artifact "
                            f"manifest")
    check_version(mf, man.get("format_version"))
    _fields(mf, man, TOP)
    for key, types in SOURCE.items():
        if key in man.get("source", {}):
            _field(mf, f"source.{key}", man["source"][key], types)
    for key in ("targets", "ignore", "model_files"):
        for i, v in enumerate(man.get(key, [])):
            _field(mf, f"{key}[{i}]", v, str)
    for name, digest in man["files"].items():
        if not (isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest)):
            raise ArtifactError(f"{mf}: field 'files.{name}' must be a sha256 hex digest, found {digest!r}")
    for name, entry in man["layers"].items():
        where = f"layers.{name}."
        _field(mf, where[:-1], entry, dict)
        _fields(mf, entry, LAYER, where)
        shape = entry["shape"]
        if len(shape) != 2 or not all(_typed(d, int) and d > 0 for d in shape):
            raise ArtifactError(f"{mf}: field '{where}shape' must be [d_out, d_in] (positive integers), found "
                                f"{shape!r}")
        b = entry["block_size"]
        if b is not None and (b <= 0 or shape[0] % b or shape[1] % b):
            raise ArtifactError(f"{mf}: field '{where}block_size' = {b} does not divide the shape {shape}")
    missing = [t for t in man.get("targets", []) if t not in man["layers"]]
    if missing:
        raise ArtifactError(f"{mf}: layer {missing[0]} is listed in 'targets' but has no entry in 'layers' "
                            f"({len(missing)} missing); the manifest was edited: re-create the artifact")
    check_groups(mf, man)


def check_groups(mf: Path, man: dict) -> None:
    """Every group names existing member layers that point back at it, with one split size per member equal
    to that member's d_out; no layer is in two groups."""
    seen: dict[str, str] = {}
    for g, rec in man.get("groups", {}).items():
        where = f"groups.{g}"
        _field(mf, where, rec, dict)
        _fields(mf, rec, {"members": (list, True), "split": (list, True)}, where + ".")
        members, split = rec["members"], rec["split"]
        if len(members) < 2 or len(split) != len(members):
            raise ArtifactError(f"{mf}: field '{where}' needs two or more members and one split size each, found "
                                f"{len(members)} member(s) and {len(split)} size(s); re-create the artifact")
        for m, size in zip(members, split):
            entry = man["layers"].get(m) if isinstance(m, str) else None
            if entry is None:
                raise ArtifactError(f"{mf}: field '{where}.members' names {m!r}, which has no entry in 'layers'; "
                                    f"the manifest was edited: re-create the artifact")
            if entry.get("fused_group") != g or m in seen:
                raise ArtifactError(f"{mf}: layer {m} is a member of group {g} but its 'fused_group' is "
                                    f"{entry.get('fused_group')!r}{' (and it is in ' + seen[m] + ')' if m in seen else ''}; "
                                    f"the manifest was edited: re-create the artifact")
            seen[m] = g
            if not _typed(size, int) or size != entry["shape"][0]:
                raise ArtifactError(f"{mf}: field '{where}.split' gives {size!r} for {m}, whose d_out is "
                                    f"{entry['shape'][0]}; the manifest was edited: re-create the artifact")
    stray = [n for n, e in man["layers"].items() if "fused_group" in e and e["fused_group"] not in man.get("groups", {})]
    if stray:
        raise ArtifactError(f"{mf}: layer {stray[0]} names group {man['layers'][stray[0]]['fused_group']!r}, which "
                            f"is not in 'groups'; the manifest was edited: re-create the artifact")
