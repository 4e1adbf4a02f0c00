import os

# Small SVDs and normal-equation updates run 10-20x slower with BLAS threads fighting over a
# shared 2-core machine; tests use one BLAS thread (set before numpy is imported).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
