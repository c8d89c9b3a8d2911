"""Helpers of the fault-injection tests (test_faults_outputs.py, test_faults_integrity.py): the CLI run in-process,
the one-clear-line check, a module-scoped tiny artifact and the edits that damage it consistently."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from armor_export.cli import main
from armor_export.fsutil import TMP_TAG
from armor_export.manifest import DIGEST


def run_cli(capsys, *args) -> tuple[int, str]:
    rc = main([str(a) for a in args])
    return rc, capsys.readouterr().err


def assert_clear(rc: int, err: str, *names) -> None:
    assert rc == 2, err
    assert "Traceback" not in err and "armor-export: error:" in err, err
    for n in names:
        assert str(n) in err, f"{n!r} not named in: {err}"


def prune_args(model, out, *extra, method="magnitude"):
    return [str(a) for a in ("prune", "--model", model, "--method", method, "--out", out, *extra)]


def tree_digest(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def leftovers(parent: Path) -> list[str]:
    """Temporaries, locks and empty checkpoint stores that a finished command must not leave."""
    return sorted(p.name for p in Path(parent).iterdir()
                  if TMP_TAG in p.name or p.name.endswith(".lock") or p.name.endswith(".partial"))


@pytest.fixture(scope="module")
def art(tiny_model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("faults") / "art"
    assert main(prune_args(tiny_model_dir, out)) == 0
    return out


def copy_art(art: Path, dst: Path) -> Path:
    shutil.copytree(art, dst)
    return dst


def rewrite_manifest(path: Path, edit) -> None:
    """Edit manifest.json and keep its digest consistent (a well-formed digest of a malformed manifest)."""
    man = json.loads((path / "manifest.json").read_text())
    edit(man)
    data = (json.dumps(man, indent=2) + "\n").encode()
    (path / "manifest.json").write_bytes(data)
    (path / DIGEST).write_text(f"{hashlib.sha256(data).hexdigest()}  manifest.json\n")


def rehash(path: Path, name: str) -> None:
    digest = hashlib.sha256((path / name).read_bytes()).hexdigest()
    rewrite_manifest(path, lambda m: m["files"].__setitem__(name, digest))


def to_version_2(path: Path) -> Path:
    """Rewrite a version-3 artifact as version 2 wrote it (all factors in one factors.safetensors)."""
    index = json.loads((path / "factors.index.json").read_text())["weight_map"]
    tensors = {}
    for shard in sorted(set(index.values())):
        tensors.update(load_file(str(path / shard)))
        (path / shard).unlink()
    (path / "factors.index.json").unlink()
    save_file(tensors, str(path / "factors.safetensors"))

    def v2(m):
        m["format_version"] = 2
        m["files"] = {k: v for k, v in m["files"].items() if k not in index.values() and k != "factors.index.json"}
        m["files"]["factors.safetensors"] = hashlib.sha256((path / "factors.safetensors").read_bytes()).hexdigest()
    rewrite_manifest(path, v2)
    return path


def flip_byte(f: Path, at: int = -2) -> None:
    data = bytearray(f.read_bytes())
    data[at] ^= 0x01
    f.write_bytes(bytes(data))
