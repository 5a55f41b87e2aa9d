"""Small fixes for other Triton versions, applied only where they are needed.

Triton 3.6's interpreter turns a loaded scalar into a Python int with `int(data)` on a
one-element numpy array, which numpy >= 2.4 refuses ("only 0-dimensional arrays can be
converted to Python scalars"), so every `range(0, n)` over a loaded `n` fails under
TRITON_INTERPRET=1. Newer Triton squeezes the array first; we install the same conversion.
Compiled kernels are unaffected (nothing here runs without the interpreter).
"""

from __future__ import annotations


def patch_interpreter() -> None:
    """Make the interpreter's tensor.__index__ squeeze one-element arrays (as Triton >= 3.7 does)."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_mango_patched", False):
        return

    def _patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    _patch_lang_tensor._mango_patched = True
    interpreter._patch_lang_tensor = _patch_lang_tensor
