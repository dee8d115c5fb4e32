"""Training (DeepSpeed ZeRO) and evaluation; trainer.clip is the shared library every stage imports."""
