"""Where and in what precision the dynamics run: the model dtypes a user can choose, the device
from `--device N`, CUDA's TF32 setting for float32 matmuls, and a clock that waits for CUDA."""
import contextlib
import time

import torch


DTYPES = {"float32": torch.float32, "float64": torch.float64}  # the model dtypes a user can choose


def pick_device(index=None, log=print):
    """cuda:index where CUDA is available (index None: 0); otherwise the CPU, with a notice
    when a CUDA index was asked for. ValueError for an index this machine does not have."""
    if torch.cuda.is_available():
        index = 0 if index is None else index
        if not 0 <= index < torch.cuda.device_count():
            raise ValueError(f"--device {index}: only {torch.cuda.device_count()} CUDA device(s) found")
        return torch.device(f"cuda:{index}")
    if index is not None:
        log(f"notice: CUDA is not available, running on CPU (--device {index} ignored)")
    return torch.device("cpu")


def _swap_matmul_precision(value):
    """Set CUDA's float32 matmul precision setting to `value` and return the previous one
    (a raw value of that setting, so it can be restored as it was). PyTorch >= 2.9 has
    fp32_precision ("tf32"/"ieee"), older versions allow_tf32; mixing both APIs is an error."""
    m = torch.backends.cuda.matmul
    name = "fp32_precision" if hasattr(m, "fp32_precision") else "allow_tf32"
    before = getattr(m, name)
    setattr(m, name, value)
    return before


def set_cuda_tf32(enabled):
    """CUDA float32 matmuls in TF32 (10-bit mantissa) or full float32 from now on; returns the
    previous setting. No effect on the CPU."""
    new_api = hasattr(torch.backends.cuda.matmul, "fp32_precision")
    return _swap_matmul_precision(("tf32" if enabled else "ieee") if new_api else bool(enabled))


@contextlib.contextmanager
def cuda_tf32(enabled):
    """`set_cuda_tf32(enabled)` inside the block, the previous setting afterwards."""
    before = set_cuda_tf32(enabled)
    try:
        yield
    finally:
        _swap_matmul_precision(before)


class Clock:
    """Seconds since the previous call (or creation), synchronising CUDA first."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.last = self.now()

    def now(self):
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def __call__(self):
        last, self.last = self.last, self.now()
        return self.last - last
