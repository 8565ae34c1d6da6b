"""COCO-style object detection task: COCO-format data, letterbox loader, COCOeval metrics.

The data layer reads any COCO-layout root (``annotations/instances_{split}.json``
plus ``{split}/`` images) through pycocotools: real COCO 2017 or the generated
``shapes`` set (:func:`tasks.detection.data.write_shapes_coco`), which runs the
whole detection sweep offline through exactly the loader that COCO uses.
Importing the package registers the ``detection`` task kind and its config
schemas (:mod:`.config`) and nothing heavier; the other submodules load on use.
"""

from tasks.detection.config import DetDataConfig, DetQatConfig, DetTrainConfig

__all__ = ["DetDataConfig", "DetQatConfig", "DetTrainConfig"]
