"""Reward-model benchmarks with their official scoring rules, and policy-answer export for external judges."""
