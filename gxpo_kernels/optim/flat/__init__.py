"""The update rules' flat-buffer state and its kernels: the buffers and their block map (buffers.py), the
extrapolation's constants (extrapolation.py, also csrc/extrapolation.h), the ops and their dispatch (ops.py,
native.py: Triton, the C++/CUDA extension _C built from csrc/, torch), shared tile code (tiles.py), AdamW with the
snapshot fused in (adamw_kernel.py) and the torch reference (reference.py)."""
