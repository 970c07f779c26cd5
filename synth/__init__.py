"""Stage one: synthesise a labelled dataset from a frozen teacher and write it as WebDataset shards."""
