"""The student trainer: TRB-blended rollouts and per-prefix reverse-KL updates."""
