"""CUDA C++ kernels for what Triton does badly, built on demand with torch's extension loader."""
