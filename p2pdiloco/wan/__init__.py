"""The WAN test bed: peers in Linux network namespaces behind shaped links (netns.py), the userspace
switch for kernels without sch_netem (wire.py), and `p2pdiloco bench wan` (bench_wan.py)."""
