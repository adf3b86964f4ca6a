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
import traceback
from typing import Optional


def release_process_group(error: Optional[BaseException] = None) -> None:
    """Free unreachable trainers and models, then destroy the default process group (a no-op outside one).

    Call it after the last reference to a prepared model is gone (`del trainer`); nothing may use the group afterwards.
    `error`, a command's failure on its way out: its traceback's frames (and those of the errors it was raised from)
    hold the trainer, so their locals are cleared first; the traceback still prints every line.
    """
    distributed = sys.modules.get("torch.distributed")
    if distributed is None or not distributed.is_available() or not distributed.is_initialized():
        # One process: nothing to join. Two full collections would cost ~0.45 s at every command's exit, and
        # clearing a traceback's locals would only take them from a debugger.
        return
    pending, seen = [error], set()
    while pending:
        chained = pending.pop()
        if chained is not None and id(chained) not in seen:
            seen.add(id(chained))
            traceback.clear_frames(chained.__traceback__)
            pending += [chained.__cause__, chained.__context__]
    gc.collect()
    distributed.destroy_process_group()
    gc.collect()  # the group's Python wrappers, so its threads are joined now rather than at exit
