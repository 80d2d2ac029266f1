"""GXPO's extrapolation constants have one home, gxpo_kernels/optim/flat/extrapolation.py: the C++ and CUDA
kernels read them from csrc/extrapolation.h beside it, which setup.py generates from it, and no path writes them
again."""

import re
from pathlib import Path

from gxpo_kernels.optim.flat import extrapolation, reference
from gxpo_kernels.optim.flat import ops as flat_ops

FLAT = Path(extrapolation.__file__).parent


def test_the_generated_header_is_current():
    assert (FLAT / "csrc" / "extrapolation.h").read_text() == extrapolation.c_header(), \
        "csrc/extrapolation.h is stale: pip install -e . (setup.py regenerates it) and commit it"


def test_no_path_writes_the_constants_again():
    for name in ("flat_ops.cpp", "flat_ops_cuda.cu"):
        src = (FLAT / "csrc" / name).read_text()
        assert '#include "extrapolation.h"' in src, name
        assert not re.search(r"-2\.f\b|\b3\.f\b|T\(-2\)|T\(3\)|\[11\]|/ 2\.0 \+ 1\.0", src), name
    for name in ("ops.py", "tiles.py", "adamw_kernel.py"):
        py = (FLAT / name).read_text()
        assert not re.search(r"-2\.0\b|\b3\.0\b|K / 2 \+ 1", py), name
    assert reference.R_MIN is extrapolation.R_MIN and reference.EXTRAP_STATS is extrapolation.EXTRAP_STATS
    assert flat_ops.EXTRAP_STATS is extrapolation.EXTRAP_STATS


def test_scale_cap():
    assert [extrapolation.scale_cap(k) for k in (2, 3, 5, 10)] == [2.0, 2.5, 3.5, 6.0]
