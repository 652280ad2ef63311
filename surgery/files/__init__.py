"""Checkpoint I/O: paired checkpoints, safetensors and DCP readers, the streaming fold, atomic outputs, model sources, JSON."""
