"""What both stages use: options, their command-line help and recipes; the shard format; the model registry;
devices and speed switches; files, plots, faults, torchrun and remote shards."""
