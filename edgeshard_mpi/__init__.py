"""EdgeShard: collaborative LLM inference over heterogeneous edge devices, in one MPI job."""

__version__ = "0.1.0"
