"""MXA Engine's benchmark suites (installed as ``mxa_bench``, run by ``mxa bench``)."""
