"""Whether Triton kernels run under Triton's interpreter (TRITON_INTERPRET=1): a leaf module that
both the backend table and the kernels read, so that neither imports the other."""
import os


def interpreting() -> bool:
    """True when TRITON_INTERPRET=1: kernels run on CPU tensors through numpy."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
