"""The planner: pure numpy (no torch, no mpi4py), so plans can be made offline for clusters
you do not have, and tested fast."""
