"""SLURM launch: plain sbatch scripts (``python -m vgen.launch``), job arrays for the data pipelines, and the W&B
run id that survives a requeue. Preemption handling lives in :mod:`vgen.callbacks.preemption`; the Hydra
submitit launcher settings in ``conf/hydra/launcher/slurm.yaml``."""
