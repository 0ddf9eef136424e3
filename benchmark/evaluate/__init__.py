"""Evaluation: what protocols are built from. `protocol` (rows, the evaluation context, metrics), `encoder` (the
frozen encoder and cached feature extraction), `finetune` (the training loop of fine-tuning protocols) and
`detection/` (COCO / VOC metrics and the Detectron2 bridge). Imports train, data, store and the ground."""
