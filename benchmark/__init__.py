"""sslbench core: registries, config, data, backbones, pretraining loop, runner and results."""
