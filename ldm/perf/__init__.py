"""Measuring speed and memory: training-step variants, sampling against diffusers, many concepts per step, loading."""
