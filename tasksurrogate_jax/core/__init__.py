"""The surrogate core: subset designs, kernels, the kernel-ridge core, linear,
kernel and Nyström surrogates, and the metrics they are judged by.
"""
