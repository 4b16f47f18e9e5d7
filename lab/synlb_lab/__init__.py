"""Network-namespace lab for synlb tests, demo and benchmark.

    from synlb_lab import Lab
    with Lab(routers=2, targets=3) as lab:
        lab.start_keepalived()
        print(lab.open_connections("10.64.2.11", count=10))

See topology.Lab for the API and addresses.py for the address plan.
"""

from .addresses import VIP, VIP4, VIP6
from .netns import LabError, cleanup_stale
from .topology import Lab, Sessions

__all__ = ["Lab", "Sessions", "LabError", "cleanup_stale", "VIP", "VIP4", "VIP6"]
