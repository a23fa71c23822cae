"""Benchmarks of the current figures (docs/PERFORMANCE.md). Run each as a module from the repository root,
`python -m bench.<name>`, so they share bench/harness.py; nern itself is the installed package."""
