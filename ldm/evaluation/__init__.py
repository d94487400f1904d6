"""Evaluation metrics for personalized generations (CLIP-I, CLIP-T, masked CLIP-I)."""
