"""Getting events in: dataset readers and the replay publisher."""
