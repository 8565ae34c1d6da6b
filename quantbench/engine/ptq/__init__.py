"""Advanced PTQ algorithms (CLE, bias correction, AdaRound, block reconstruction, sensitivity, mixed precision)."""
