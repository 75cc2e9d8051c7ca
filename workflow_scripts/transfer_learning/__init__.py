"""Transfer learning for image classification, one importable piece per workflow stage.

The scripts beside this package are thin command-line entry points over it, so every stage
runs by hand on an interactive node with the arguments its Snakemake rule passes.
"""
