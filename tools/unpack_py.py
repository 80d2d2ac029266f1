"""A wheel's .py files, and nothing else, into a folder: python tools/unpack_py.py WHEEL DEST. The vLLM contract
test reads vLLM's source this way (tests/test_vllm_contract.py), without installing it or its dependencies."""

import sys
import zipfile
from pathlib import Path

if __name__ == "__main__":
    wheel, dest = Path(sys.argv[1]), Path(sys.argv[2])
    with zipfile.ZipFile(wheel) as z:
        names = [n for n in z.namelist() if n.endswith(".py")]
        if not names:
            raise SystemExit(f"{wheel}: no .py files")
        z.extractall(dest, members=names)
    print(f"{wheel.name}: {len(names)} .py files into {dest}")
