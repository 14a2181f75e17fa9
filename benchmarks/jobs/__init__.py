"""Task modules for benchmarks/bench_jobs.py: one no-op task per framework."""
