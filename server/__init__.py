"""privface server package.

The server parallelises across requests (gRPC worker threads), so numpy's BLAS runs
single-threaded: multi-threaded BLAS on a shared 2-core machine costs ~10 ms of thread
hand-off per small product (measured: 10k-row search 12 ms vs 0.09 ms).
"""

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
