"""Train and eval modes: which modes a model's graphs differ in (`modal`), and the other mode's
graph cut where the traced one was (`split`)."""
