"""The captured model: the dataflow IR (graph), capture (fx / torch.export) and the normalisation of ops to canonical kinds."""
