"""Ending a multi-process run cleanly: the one place that hands the torch.distributed group back.

Under `accelerate launch` every rank joins a gloo / NCCL group. `destroy_process_group()` alone does not stop gloo: the
DDP wrapper (and its C++ reducer) still holds the group, so its worker threads (`pt_gloo_runloop`, `gloo_tcp_loop`) run
on until that wrapper is freed. When the wrapper lives in a reference cycle (a trainer and its accelerator), that is at
interpreter shutdown, where destroying the threads' tensors needs a Python that is half gone: the process, which
finished and saved everything, dies with SIGABRT ("terminate called without an active exception",
pytorch/pytorch#190489) and the launcher reports the whole run failed. Freeing the cycles first and then destroying the
group joins those threads while the interpreter is whole.
"""

from __future__ import annotations

import gc
import sys


def release_process_group() -> None:
    """Free unreachable trainers and models, then destroy the default process group (a no-op outside one).

    Call it after the last reference to a prepared model is gone (`del trainer`); nothing may use the group afterwards.
    """
    gc.collect()
    distributed = sys.modules.get("torch.distributed")
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        distributed.destroy_process_group()
    gc.collect()  # the group's Python wrappers, so its threads are joined now rather than at exit
