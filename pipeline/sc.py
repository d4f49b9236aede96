"""Where the model looked, as DICOM: a Secondary Capture of the Grad-CAM overlay, one per study.

:func:`gradcam_capture` renders the study's highest-scoring image as the model saw it (its preprocessed
tensor, grey) with the Grad-CAM heat map of the positive class over it (``jet``, blended where the map
is above 0.2), the score, threshold and decision burned in as text beside the image, and wraps it in a
highdicom Secondary Capture Image that belongs to the original study: patient and study attributes
from the evidence (the original headers, read on site), a new series (number 9902) whose description
says it is not for diagnostic use. UIDs are derived from the model and study, so a rerun writes the
same object and a PACS that holds it is not sent it again. It is not a diagnostic image: the pixels
are the model's input resolution, and burned-in text says what it is (BurnedInAnnotation YES).
"""

from __future__ import annotations

import numpy as np
from pydicom import Dataset
from pydicom.uid import generate_uid

from pipeline.sr import DISCLAIMER

SERIES_NUMBER = 9902
MIN_SIDE = 512  # px: the overlay is enlarged (nearest neighbour: no invented detail) to at least this
CAM_FLOOR = 0.2  # heat below this is not drawn: the image stays readable where the model did not look


def overlay(image: np.ndarray, cam: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8: the tensor (C, H, W in [0, 1]) as grey, the map (H, W in [0, 1]) in jet over it."""
    from matplotlib import colormaps

    grey = np.clip(np.asarray(image, np.float32).mean(axis=0), 0, 1)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    heat = colormaps["jet"](np.clip(cam, 0, 1))[..., :3].astype(np.float32)
    alpha = np.where(cam >= CAM_FLOOR, 0.45 * cam, 0.0)[..., None].astype(np.float32)
    out = (1 - alpha) * rgb + alpha * heat
    scale = max(1, int(np.ceil(MIN_SIDE / max(out.shape[:2]))))
    out = np.kron(out, np.ones((scale, scale, 1), np.float32))
    return (np.clip(out, 0, 1) * 255).round().astype(np.uint8)


def _caption(pixels: np.ndarray, lines: list[str]) -> np.ndarray:
    """The image with a black band below it holding ``lines`` (Pillow's default font)."""
    from PIL import Image, ImageDraw

    band = 18 * len(lines) + 12
    canvas = Image.new("RGB", (pixels.shape[1], pixels.shape[0] + band), (0, 0, 0))
    canvas.paste(Image.fromarray(pixels), (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        draw.text((8, pixels.shape[0] + 6 + 18 * i), line, fill=(255, 255, 255))
    return np.asarray(canvas)


def gradcam_capture(evidence: Dataset, image: np.ndarray, cam: np.ndarray, *, score: float, threshold: float,
                    positive_class: str, model_name: str, model_version: str, model_sha256: str) -> Dataset:
    """A Secondary Capture of the Grad-CAM overlay in the study of ``evidence`` (an original header)."""
    import highdicom

    decision = "positive" if score >= threshold else "negative"
    pixels = _caption(overlay(image, cam), [
        f"{model_name} {model_version}: {positive_class} score {score:.3f}, threshold {threshold:.3f}: {decision}",
        f"Grad-CAM of '{positive_class}'. {DISCLAIMER}"])
    seed = [model_sha256, str(evidence.StudyInstanceUID), "gradcam"]
    sc = highdicom.sc.SCImage.from_ref_dataset(
        ref_dataset=evidence, pixel_array=pixels, photometric_interpretation="RGB", bits_allocated=8,
        coordinate_system="PATIENT", series_instance_uid=generate_uid(entropy_srcs=[*seed, "series"]),
        series_number=SERIES_NUMBER, sop_instance_uid=generate_uid(entropy_srcs=[*seed, "sop"]), instance_number=1,
        manufacturer="medtl", patient_orientation=("L", "F"), transfer_syntax_uid="1.2.840.10008.1.2.1")
    sc.SeriesDescription = DISCLAIMER
    sc.ImageComments = f"Grad-CAM overlay of {model_name} {model_version}; not for diagnostic use"
    sc.BurnedInAnnotation = "YES"
    sc.Laterality = ""  # Type 2C in General Series: empty (unknown or unpaired), as the source carries none
    return sc
