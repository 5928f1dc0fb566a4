"""Distillation merging: one student trained to match several teachers (docs/methods/distill.md)."""
