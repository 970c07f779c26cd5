"""Stage two: distill students from synth's WebDataset shards; train teachers on real data."""
