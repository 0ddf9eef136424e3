"""sslbench core, read top-down, one folder a layer; a module imports only from its own layer or below:

    run/       cli, runner, executor, status, suites, throughput       (orchestration)
    evaluate/  protocol, encoder, finetune, detection/                 (what protocols are built from)
    train/     method contract, pretraining loop, optim, heads, ...    (what methods are built from)
    data/      image sets, datasets, readers, VOC, detection data, augmentation
    store/     atomic io, provenance, checkpoints, results, importers
    *.py       backbones, config, registry, errors, device             (everyone's ground)

The plugin packages `methods/` and `protocols/` sit between evaluate/ and run/. `tests/test_layers.py` enforces it.
"""
