"""The front: the editors a user holds and what they run.

- `editor.py`: `SparseEditor`, the verbs and the session of a diffusers pipeline (capture, edit, history, save/load).
- `gan.py`: `GANEditor`, the same for conditional GAN generators.
- `inputs.py`: the checks of the editors' arguments and the inputs of an edit.
- `loop.py`: `Loop`, the sparsified models of one pipeline and the denoising loop's steps; `Capture`, what a capture
  keeps.
- `runs.py`: `CaptureRun` and `EditRun`, one capture or edit as an object driving the loop.
- `budget.py`: cache bytes by part, peak memory, a capture fitted to `cache_budget`.
- `sessions.py`: saved sessions, all or nothing.
"""

from .editor import SparseEditor
from .gan import GANEditor
from .sessions import CorruptSessionError


__all__ = ["CorruptSessionError", "GANEditor", "SparseEditor"]
