"""Methods beside surgery: turn a plan into new expert tensors (merging). The writer is shared."""
