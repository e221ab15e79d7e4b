"""The fused ops, one package each: the public function with its argument checks (``api.py``), the
eager reference (``reference.py``) and the Triton kernels with their launchers and ``torch.library``
registration (``kernels.py``, imported only where Triton imports). ``mxa_kernels.registry`` lists them."""
