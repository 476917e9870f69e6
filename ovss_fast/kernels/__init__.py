"""Kernels: the spec in plain PyTorch (:mod:`.reference`), the compiled extension's and Triton's
backends, and the choice between them (:mod:`.dispatch`)."""
