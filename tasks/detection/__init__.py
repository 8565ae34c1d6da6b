"""COCO-style object detection task: COCO-format data, letterbox loader, COCOeval metrics.

The data layer reads any COCO-layout root (``annotations/instances_{split}.json``
plus ``{split}/`` images) through pycocotools: real COCO 2017 or the generated
``shapes`` set (:func:`tasks.detection.data.write_shapes_coco`), which runs the
whole detection sweep offline through exactly the loader that COCO uses.
Submodules are imported on use; this package imports nothing heavy by itself.
"""

__all__: list[str] = []
