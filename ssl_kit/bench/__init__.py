"""Benchmarks: the ``python -m ssl_kit bench`` job (:mod:`~ssl_kit.bench.job`) and the per-method and
per-component benchmarks, each run as ``python -m ssl_kit.bench.NAME`` (knn, linear, fcmae, relicv2,
eva, data); they print figures."""
