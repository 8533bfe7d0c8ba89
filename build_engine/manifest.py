"""manifest.json: what an artifact folder was made from, with which settings and versions, and the
hash of every file in it. Downstream steps read settings from here, never from file names."""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import importlib.metadata
import json
import platform
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from build_engine import UserError

NAME = "manifest.json"
PACKAGES = ("hermes-trtllm", "torch", "transformers", "nvidia-modelopt", "safetensors", "onnx",
            "onnxruntime", "onnxruntime-genai", "tensorrt-llm", "tritonclient")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# The project's own code, as installed or checked out: its packages' .py files and presets.
SOURCE_PACKAGES = ("common", "build_engine", "model_repo", "client", "benchmarks")
SOURCE_PATTERNS = ("**/*.py", "presets/*.json")


def source_digest() -> str:
    """sha256 over the project's code (SOURCE_PACKAGES: path and bytes of each file), the same for a
    checkout and for an install of it: the version number stays 0.1.0 while the code changes, so
    manifests and the serving image's label carry this."""
    root = Path(__file__).resolve().parent.parent
    # Regular files only, and nothing hidden (an editor's lock files, .ipynb_checkpoints): what an
    # install of the package holds.
    files = sorted({f for pkg in SOURCE_PACKAGES for pat in SOURCE_PATTERNS for f in (root / pkg).glob(pat)
                    if f.is_file() and "__pycache__" not in f.parts
                    and not any(part.startswith(".") for part in f.relative_to(root).parts)})
    if not files:
        raise UserError(f"no source files of {', '.join(SOURCE_PACKAGES)} under {root}: cannot say which code this is")
    h = hashlib.sha256()
    for f in files:
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "hermes-trtllm-source": source_digest()}
    for p in PACKAGES:
        try:
            out[p] = importlib.metadata.version(p)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def file_hashes(folder: Path) -> dict[str, dict]:
    folder = Path(folder)
    return {
        str(p.relative_to(folder)): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != NAME
    }


def write(folder: Path, kind: str, **sections) -> dict:
    manifest = {
        "kind": kind,
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **sections,
        "versions": versions(),
        "files": file_hashes(folder),
    }
    (Path(folder) / NAME).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return manifest


# The command that makes each kind of artifact, for the message when one is missing.
MADE_BY = {
    "trtllm-checkpoint": "python -m build_engine quantize",
    "cpu-engine": "python -m build_engine build --target cpu",
    "synthetic-engine": "python -m build_engine build --target synthetic",
    "trtllm-engine": "python -m build_engine build --target gpu",
    "triton-repository": "python -m model_repo generate",
}
DEMO_ARTIFACTS = "artifacts/smollm2-135m-instruct"  # where `make demo` builds its checkpoint, engine and repository


def read(folder: Path, kind: str | None = None) -> dict:
    path = Path(folder) / NAME
    if not Path(folder).is_dir():
        made_by = f"build it with {MADE_BY[kind]}, or " if kind in MADE_BY else ""
        raise UserError(f"{folder} does not exist: {made_by}check the path (make demo builds {DEMO_ARTIFACTS}/"
                        "checkpoint, engine-cpu and model_repository)")
    if not path.is_file():
        raise UserError(f"{folder} has no {NAME}: not an artifact made by hermes-trtllm")
    m = json.loads(path.read_text())
    if kind is not None and m.get("kind") != kind:
        raise UserError(f"{folder} holds a {m.get('kind')!r}, expected a {kind!r}")
    return m


def verify_files(folder: Path) -> list[str]:
    """Names of files whose hash no longer matches the manifest (missing files included)."""
    m = read(folder)
    now = file_hashes(folder)
    return sorted(n for n, v in m["files"].items() if now.get(n, {}).get("sha256") != v["sha256"])


def publish(tmp: Path, output: Path) -> None:
    """Move a finished artifact folder into place (replacing an older one), world-readable."""
    Path(tmp).chmod(0o755)
    if output.exists():
        shutil.rmtree(output)
    Path(tmp).rename(output)


@contextlib.contextmanager
def staging(output: Path) -> Iterator[Path]:
    """Stage, validate, publish: the block writes into a temporary sibling of `output`, which is
    published at `output` only when the block succeeds. A failure leaves no partial folder behind."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    try:
        yield tmp
        publish(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":  # make gpu-image labels the image with it
    print(source_digest())
