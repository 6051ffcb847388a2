"""Data sets and shard I/O for elastic_ray."""
