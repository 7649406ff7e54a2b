"""Builders and benchmarks beside the project: the toy world, the tiny test models, peer and toy benchmarks, memory estimates."""
