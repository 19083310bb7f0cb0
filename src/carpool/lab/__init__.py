"""The lab: clusters of network namespaces for tests, benchmarks and the demo."""

from carpool.lab.cluster import Interface, Lab, LabProcess, Network, Node
from carpool.lab.shell import LabError

__all__ = ["Interface", "Lab", "LabError", "LabProcess", "Network", "Node"]
