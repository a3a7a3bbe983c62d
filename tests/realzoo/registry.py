"""Every zoo model by name, smallest first."""

from tests.realzoo import crepe, ddddocr_ocr, minilm, mtcnn, ppocr, yolo_nudenet
from tests.realzoo.recipe import Recipe

RECIPES: dict[str, Recipe] = {r.name: r for r in (ppocr.CLS, mtcnn.RECIPE, crepe.RECIPE, ppocr.REC, ppocr.DET, yolo_nudenet.RECIPE, ddddocr_ocr.RECIPE, minilm.RECIPE)}
