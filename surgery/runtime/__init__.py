"""The runtime of pairs: the Pair module, attaching pairs per a Plan, folding them, and sharded (FSDP2) models."""
