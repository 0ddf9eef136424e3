"""Detection evaluation: `deteval` (COCO AP through pycocotools, VOC07 AP) and `d2backend` (the Detectron2 bridge:
weight conversion, recipes, training; Detectron2 itself is imported only inside its functions)."""
