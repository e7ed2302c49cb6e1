"""Build hook for the optional CUDA C++ extension under csrc/.

Everything in the package is pure Python (PyTorch + Triton). The CUDA C++ sources under
csrc/ are compiled only when csrc/ holds sources *and* a CUDA toolchain is present at
build time; anywhere else the package installs without them and the Triton / PyTorch
paths serve every op. Nothing here probes a GPU: a missing nvcc simply means no extension.
"""
import glob
import os

from setuptools import setup


def cuda_extensions():
    sources = sorted(glob.glob(os.path.join("csrc", "*.cu")) + glob.glob(os.path.join("csrc", "*.cpp")))
    if not sources or os.environ.get("FUSED_LORA_NO_CUDA_EXT") == "1":
        return [], {}
    try:
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return [], {}
    if CUDA_HOME is None:
        return [], {}
    ext = CUDAExtension("fused_lora._C", sources, extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]})
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = cuda_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
