"""Triton 3.6's interpreter, made to compute what the GPU computes. The tests run every kernel under it on
machines without CUDA (TRITON_INTERPRET=1), so its three gaps would otherwise be test failures or, worse, passes
for the wrong reason:

- a loop bound derived from program_id or loaded from memory is a 1-element array, and `range` calls int() on it,
  which numpy >= 2.4 refuses (triton-lang/triton#9171, fixed upstream by squeezing);
- tl.dot on bf16 multiplies the raw uint16 bit patterns (bf16 is stored as uint16; the interpreter supports bf16
  arithmetic only through casts, triton-lang/triton#11584): convert the operands to fp32 first, which is exact, as
  the tensor cores' products are;
- fp32 -> bf16 conversion truncates (and its 'rtne' mode rounds half up and can lose the carry), where the GPU's
  cvt.rn.bf16.f32 rounds to nearest even, as torch does: give it torch's rounding, so the bit-exactness claims of
  the kernel tests are tested on the CPU too.
"""
from __future__ import annotations

import numpy as np
import torch
import triton.language as tl


def patch_interpreter() -> None:
    """Idempotent; a no-op's worth of cost when the interpreter is not used."""
    from triton.runtime import interpreter
    if getattr(interpreter, "_pagestream_patched", False):
        return
    builder = interpreter.InterpreterBuilder
    patch_tensor, create_dot, convert_float = (interpreter._patch_lang_tensor, builder.create_dot,
                                               interpreter._convert_float)

    def patched_tensor(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

    def bf16_to_fp32(x):
        if x.dtype == tl.bfloat16:
            return interpreter.TensorHandle((x.data.astype(np.uint32) << 16).view(np.float32), tl.float32)
        return x

    def patched_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return create_dot(self, bf16_to_fp32(a), bf16_to_fp32(b), d, input_precision, max_num_imprecise_acc)

    def patched_convert(data, src_ty, dst_ty, rounding_mode):
        if src_ty == tl.float32 and dst_ty == tl.bfloat16 and rounding_mode != interpreter._ir.ROUNDING_MODE.RTZ:
            f32 = torch.from_numpy(np.array(data, dtype=np.float32, copy=True))
            return f32.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        return convert_float(data, src_ty, dst_ty, rounding_mode)

    interpreter._patch_lang_tensor = patched_tensor
    builder.create_dot = patched_dot
    interpreter._convert_float = patched_convert
    interpreter._pagestream_patched = True
