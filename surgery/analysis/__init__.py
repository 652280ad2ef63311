"""Analysis of the dataflow: block boundaries, fold routes, the numeric self-check, width groups."""
