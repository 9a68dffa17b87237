"""Optimize for me: a search over the declared passes (``compression.passes``) for the best variant within a
tolerance, judged by the metric the outputs call for, with every trial recorded (see docs/compression.md)."""
