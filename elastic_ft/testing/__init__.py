"""Tools for tests and benchmarks (a multi-node Ray cluster on one machine); the product
code never imports this package."""
