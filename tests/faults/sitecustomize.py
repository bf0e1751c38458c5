"""Fault injection for ``tests/test_faults.py``: Python imports this at start-up when this folder is
first on ``PYTHONPATH``. Nothing happens unless ``SSL_KIT_FAULT`` is set to ``KIND:STEP``:

* ``kill_after_save:N``: SIGKILL right after ``last.ckpt`` of global step N is written.
* ``kill_in_save:N``: SIGKILL half-way through writing ``last.ckpt`` of global step N.
* ``enospc_in_save:N``: writing ``last.ckpt`` of global step N fails with ENOSPC after some bytes.
"""

import errno
import os
import signal

FAULT = os.environ.get("SSL_KIT_FAULT")

if FAULT:
    import torch

    import ssl_kit.callbacks.checkpoint as checkpoint

    KIND, STEP = FAULT.split(":")[0], int(FAULT.split(":")[1])
    real_save, real_atomic = torch.save, checkpoint.atomic_torch_save

    def _targeted(obj, path) -> bool:
        return isinstance(obj, dict) and obj.get("global_step") == STEP and os.path.basename(path) == "last.ckpt"

    def atomic_torch_save(obj, path):
        if not _targeted(obj, path) or KIND == "kill_after_save":
            real_atomic(obj, path)
            if _targeted(obj, path):
                os.kill(os.getpid(), signal.SIGKILL)
            return
        def broken_save(data, f):  # part of the file reaches the disk, then the fault
            f.write(b"PK\x03\x04 partial checkpoint bytes" * 64)
            f.flush()
            if KIND == "kill_in_save":
                os.kill(os.getpid(), signal.SIGKILL)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        torch.save = broken_save
        try:
            real_atomic(obj, path)
        finally:
            torch.save = real_save

    checkpoint.atomic_torch_save = atomic_torch_save
