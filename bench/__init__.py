"""The benchmark suite (issue 4): `make bench`, `make bench-full`."""
