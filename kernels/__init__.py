"""Compute kernels, installed as ``embedserve.kernels``. Each kernel has a pure-torch twin."""
