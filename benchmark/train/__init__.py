"""Pretraining: `method` (the typed contract a method plugin fulfils), `pretrain` (the shared, resumable loop),
`optim` (optimisers, LARS, lr schedule), `schedules`, `monitors` (collapse), `heads` (MLP builders), `kmeans`, and
`distributed` (collectives, the DDP process group). Imports data, store and the ground."""
