"""Array aliases with named dimensions: d = feature dimension, K = arms, A = algorithms,
R = replicas (seeds), C = cases of a config, B = recording blocks."""

from jaxtyping import Array, Bool, Float, Int

Scalar = Float[Array, ""]
Vector = Float[Array, " d"]
Matrix = Float[Array, "d d"]
Contexts = Float[Array, "K d"]
ArmVector = Float[Array, " K"]
IntScalar = Int[Array, ""]
BoolScalar = Bool[Array, ""]
