"""Bridges to the formats and tools people already use: diffusers folders in, CatVersion concepts out to diffusers."""
