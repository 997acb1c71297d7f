"""Prints the erf table of `dw5d_jax/_csrc/epilogue.h` (`kErfTable`).

erf(t) on [0, 4.5) is cut into 32 intervals of width 4.5 / 32; on
interval i it is a degree-4 polynomial in u = t * 32 / 4.5 - i, in [0, 1),
the near-minimax Chebyshev fit (600 Chebyshev points, float64 `math.erf`)
converted to monomials and rounded to float32. Interval 0 fits erf(t) / t
times u, so that erf(0) is exactly 0 and small arguments keep their
relative accuracy. Beyond 4.5, erf is 1 in float32 (1 - 2e-10).

The float32 result's error against float64 `math.erf`, measured over every
float32 by tests/test_epilogue.py, is below 1e-7 (about 1.5 ulp of 1).

Usage: `python build_support/erf_table.py` (rows: the coefficients of u^4
down to u^0, each over the 32 intervals).
"""

import math

import numpy as np

INTERVALS, DEGREE, TOP = 32, 4, 4.5


def table() -> np.ndarray:
  """`(DEGREE + 1, INTERVALS)` float32: row k holds the coefficients of u^(DEGREE - k)."""
  width = TOP / INTERVALS
  erf = np.vectorize(math.erf)
  u = np.cos(np.linspace(0, math.pi, 600)) * 0.5 + 0.5
  rows = []
  for i in range(INTERVALS):
    if i == 0:
      v = u[u > 0]
      fit = np.polynomial.chebyshev.Chebyshev.fit(v, erf(v * width) / v, DEGREE - 1, domain=[0, 1])
      coef = np.concatenate([[0.0], fit.convert(kind=np.polynomial.Polynomial).coef])
    else:
      fit = np.polynomial.chebyshev.Chebyshev.fit(u, erf((i + u) * width), DEGREE, domain=[0, 1])
      coef = fit.convert(kind=np.polynomial.Polynomial).coef
    rows.append(coef)
  return np.array(rows, np.float32).T[::-1]


if __name__ == "__main__":
  for row in table():
    print("    {" + ", ".join(f"{v:.9e}f" for v in row) + "},")
