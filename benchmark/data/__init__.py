"""Data: `sets` (in-memory `ImageSet` / `Splits`), `datasets` (finding, loading and splitting a named dataset),
`readers` (Fashion-MNIST, digits, CIFAR, STL-10, ImageFolder), `voc` (VOC07 classification), `detection` (detection
sets: VOC / COCO readers, the embedded set), `augment` (batched per-sample views) and `colour`. Imports store and
the ground."""
