"""`make bench`: kd's engine against the plain PyTorch loop people write by hand, side by side.

cifar10_files: random pixels in CIFAR-10's on-disk format; tutorial: the plain loop; sides: each
side of a case in its own process; cost: FLOPs, the matmul peak, the machine's load; __main__: the
cases' rounds, the table and bench.csv.
"""
