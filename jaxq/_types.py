"""Array type aliases with named dimensions: I = job classes, n = GPUs, R = replicas."""

from jaxtyping import Array, Float, Int

Scalar = Float[Array, ""]
ClassVector = Float[Array, " I"]
ClassCounts = Int[Array, " I"]
