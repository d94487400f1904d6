"""Analysis tools: cross-attention maps of the UNet and the automatic concept masks made from them."""
