"""Performance tooling shared by metrics, aot, benchmark and sweep: the hardware catalog
(hardware.py), slice and host topologies (topology.py), parameter and FLOP counting (counting.py),
the one HLO text reader (hlo.py) with what is read from it (collectives.py, matmuls.py), and the
roofline of a compiled step (roofline.py). Nothing here imports training, data or entry points."""
