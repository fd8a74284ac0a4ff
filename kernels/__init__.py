"""Triton kernels, each beside its PyTorch reference.

Integer arguments that change from step to step (row counts, sequence counts, block-table widths, split counts)
are marked do_not_specialize: Triton otherwise compiles a new variant of a kernel whenever such a value first
turns out to be 1 or a multiple of 16, which happens mid-serving, long after the warm-up (the prefill kernel took
0.7 s to compile on the H200 when 256 prefix-cached prompts were admitted at once). Arguments fixed by the model
(head counts, strides of the model's tensors) stay specialized.
"""
