"""Benchmarks: `python -m tsm.bench.speed` times timestep experts against plain LoRA, PEFT and the base model."""
