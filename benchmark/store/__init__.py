"""Storage: `io` (atomic writes), `provenance` (git SHA, versions, time), `checkpoints` (verified, rotating
training checkpoints), `results` (rows, records, the leaderboard tables) and `importers` (published checkpoint
layouts). Imports only the ground (`benchmark/*.py`)."""
