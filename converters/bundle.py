"""Signed mobile app bundles: one zip with the iOS and Android artifacts, labels, reports and a signed manifest.

Layout::

    manifest.json          what is in the bundle and how to feed it (canonical JSON, signed)
    manifest.sig.json      {"keyid", "sig"}: Ed25519 over manifest.json's exact bytes (fleet_protocol keys)
    labels.txt             class labels, one per line (when given)
    ios/<name>.mlpackage/  the Core ML package (every file listed in the manifest)
    android/<name>.tflite  the TFLite INT8 model
    reports/<profile>.<format>.json   the fidelity reports, host-independent parts only

The manifest lists every other member with its sha256 and size; verification accepts nothing unlisted. The zip is
reproducible: members in sorted order, fixed timestamps and permissions, and reports stripped of what depends on
the build host (timings, memory, temp paths), so the same inputs give the same bytes.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from securesystemslib.exceptions import UnverifiedSignatureError
from securesystemslib.signer import Signature, Signer, SSlibKey

from converters.calibration import ImagePrep
from converters.coreml_int8 import package_files, tree_sha256
from converters.errors import ConvertError
from converters.report import ArtifactReport, Status

BUNDLE_FORMAT = "edgefleet-app-bundle/1"
MANIFEST, SIGNATURE, LABELS = "manifest.json", "manifest.sig.json", "labels.txt"
ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # the earliest date zip can store: no build time in the bytes
MAX_MEMBERS = 10_000
MAX_MANIFEST_BYTES = 4 << 20
HOST_FIELDS = {"latency": None, "versions": None, "peak_rss_mb": None,  # the build host, not the artifact
               "search": None}
HOST_SUBFIELDS = ("conversion_seconds", "conversion_peak_rss_mb")


class BundleError(ConvertError):
    """A bundle that cannot be built or does not verify."""

    exit_code = 5


@dataclass(frozen=True)
class Platform:
    """One platform's artifact in a bundle: the report that judged it and where the artifact lies."""

    key: str  # "ios" | "android"
    report: ArtifactReport
    artifact: Path


def _canonical(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _round(obj: object) -> object:
    """Floats to 6 significant digits: figures a person reads, and no last-bit noise in reproducible bytes."""
    if isinstance(obj, float):
        return float(f"{obj:.6g}")
    if isinstance(obj, dict):
        return {k: _round(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_round(v) for v in obj]
    return obj


def portable_report(report: ArtifactReport) -> dict:
    """The report without what depends on the build host (timings, memory, library builds, temp paths)."""
    data = report.model_dump(mode="json", exclude=set(HOST_FIELDS))
    for section in ("tflite", "coreml"):
        if data.get(section):
            for key in HOST_SUBFIELDS:
                data[section].pop(key, None)
    if data.get("source"):
        data["source"]["path"] = Path(data["source"]["path"]).name
    data["checks"] = [c for c in data["checks"] if not c["name"].startswith("latency")]
    data["notes"] = [n for n in data["notes"] if not n.startswith("latency regression")]
    return _round(data)  # type: ignore[return-value]


def _tensor_entries(report: ArtifactReport, prep: ImagePrep | None, tflite_io: dict | None) -> list[dict]:
    """What the app feeds: per input, shape, dtype, layout, preprocessing (and INT8 quantization for TFLite)."""
    entries = []
    for text in report.source.inputs if report.source else []:
        name, shape, dtype = _parse_spec(text)
        entry: dict = {"name": name, "shape": shape, "dtype": dtype}
        if report.tflite is not None:
            entry["layout"] = report.tflite.input_layouts.get(name, "as in the ONNX model")
        elif report.coreml is not None:
            entry["shape"] = report.coreml.inputs[name]["shape"]
            entry["layout"] = "as in the ONNX model"
        if tflite_io and name in tflite_io:
            entry.update(tflite_io[name])
        if prep is not None and len(shape) == 4:
            entry["preprocessing"] = {"resize": [prep.height, prep.width], "channel_order": prep.channel_order,
                                      "scale": prep.scale, "mean": list(prep.mean), "std": list(prep.std),
                                      "formula": "(pixel * scale - mean) / std"}
        else:
            entry["preprocessing"] = "none declared: feed tensors like the calibration data"
        entries.append(entry)
    return entries


def _parse_spec(text: str) -> tuple[str, list, str]:
    m = re.fullmatch(r"(.+)\[([^\]]*)\] (\w+)", text)
    if not m:
        return text, [], ""
    dims = [int(d) if d.isdigit() else d for d in m.group(2).split(",") if d]
    return m.group(1), dims, m.group(3)


def _by_onnx_order(details: dict, onnx_names: list[str]) -> list[tuple[str, dict]]:
    """TFLite signature outputs in the ONNX output order: by name, or ``output_0``, ``output_1``... by position."""
    if set(details) == set(onnx_names):
        return [(n, details[n]) for n in onnx_names]
    if len(details) != len(onnx_names):
        raise BundleError(f"the TFLite model has outputs {sorted(details)}; the source has {onnx_names}")
    ordered = sorted(details, key=lambda n: int(n.rsplit("_", 1)[-1]) if n.rsplit("_", 1)[-1].isdigit() else 0)
    return [(n, details[n]) for n in ordered]


def tflite_io_quantization(path: Path) -> tuple[dict, dict]:
    """Per input and output of a .tflite: dtype and (scale, zero point) when it is INT8 — the app needs them."""
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(path))
    runner = it.get_signature_runner()

    def describe(details: dict) -> dict:
        out = {}
        for name, d in details.items():
            entry = {"tflite_dtype": str(d["dtype"].__name__), "tflite_shape": [int(x) for x in d["shape"]]}
            scale, zero = d["quantization"]
            if d["dtype"].__name__ == "int8":
                entry["quantization"] = {"scale": float(scale), "zero_point": int(zero),
                                         "formula": "int8 = clamp(round(x / scale) + zero_point, -128, 127)"}
            out[name] = entry
        return out

    return describe(runner.get_input_details()), describe(runner.get_output_details())


def manifest_for(name: str, version: str, platforms: list[Platform], *, labels: list[str],
                 prep: ImagePrep | None, converter_versions: dict[str, str]) -> tuple[dict, dict[str, bytes | Path]]:
    """The manifest (without its ``files`` table) and the members it describes."""
    members: dict[str, bytes | Path] = {}
    entries = {}
    first = platforms[0].report
    for p in platforms:
        r = p.report
        if r.status is not Status.SHIPPABLE:
            raise BundleError(f"{p.key}: the {r.format} artifact for {r.profile} is {r.status.value}: "
                              + "; ".join(r.reasons))
        report_name = f"reports/{r.profile}.{r.format}.json"
        members[report_name] = json.dumps(portable_report(r), indent=2, sort_keys=True).encode() + b"\n"
        tflite_in = tflite_out = None
        if p.artifact.is_dir():
            base = f"{p.key}/{name}.mlpackage"
            for f in package_files(p.artifact):
                members[f"{base}/{f.relative_to(p.artifact).as_posix()}"] = f
            digest = tree_sha256(p.artifact)
        else:
            base = f"{p.key}/{name}{p.artifact.suffix}"
            members[base] = p.artifact
            digest = hashlib.sha256(p.artifact.read_bytes()).hexdigest()
            if r.tflite is not None:
                tflite_in, tflite_out = tflite_io_quantization(p.artifact)
        kinds = {o.name: o.kind.value for o in r.fidelity}
        outputs = []
        for text in r.source.outputs if r.source else []:
            out_name, shape, dtype = _parse_spec(text)
            outputs.append({"name": out_name, "shape": shape, "dtype": dtype, "kind": kinds.get(out_name)})
        if tflite_out:
            for entry, (tflite_name, io) in zip(outputs, _by_onnx_order(tflite_out, [o["name"] for o in outputs]),
                                                strict=True):
                entry.update({"tflite_name": tflite_name, **io})
        entries[p.key] = {
            "profile": r.profile, "profile_version": r.profile_version, "format": r.format, "artifact": base,
            "sha256": digest, "sha256_kind": "tree" if p.artifact.is_dir() else "file",
            "inputs": _tensor_entries(r, prep, tflite_in), "outputs": outputs, "report": report_name,
            "fidelity": {o.name: {"cosine": o.cosine, "sqnr_db": o.sqnr_db, "top1_agreement": o.top1_agreement}
                         for o in r.fidelity},
            "numeric_fidelity_measured": r.coreml.numeric_fidelity_measured if r.coreml else True,
            "size_ratio": r.size.ratio if r.size else None,
            **({"minimum_ios": r.coreml.minimum_ios} if r.coreml else {}),
            **({"io_type": r.tflite.io_type} if r.tflite else {}),
        }
    if labels:
        members[LABELS] = "".join(f"{label}\n" for label in labels).encode()
    manifest = {
        "format": BUNDLE_FORMAT,
        "model": {"name": name, "version": version},
        "labels": LABELS if labels else None,
        "platforms": entries,
        "provenance": {
            "source_sha256": first.source.sha256 if first.source else None,
            "source_name": Path(first.source.path).name if first.source else None,
            "calibration_sha256": first.calibration.sha256 if first.calibration else None,
            "calibration_samples": first.calibration.samples if first.calibration else None,
            "evaluation_sha256": first.evaluation.sha256 if first.evaluation else None,
            "synthetic_calibration": first.calibration.synthetic if first.calibration else None,
            "converter": converter_versions,
        },
    }
    return _round(manifest), members  # type: ignore[return-value]


def write_bundle(out: Path, manifest: dict, members: dict[str, bytes | Path], signer: Signer) -> str:
    """Write the zip (reproducibly) and return the sha256 of its bytes."""
    files = {}
    contents = {}
    for name in sorted(members):
        src = members[name]
        data = src if isinstance(src, bytes) else src.read_bytes()
        contents[name] = data
        files[name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    manifest = {**manifest, "files": files}
    manifest_bytes = _canonical(manifest)
    sig = signer.sign(manifest_bytes)
    signature_bytes = _canonical(sig.to_dict())
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in [(MANIFEST, manifest_bytes), (SIGNATURE, signature_bytes), *contents.items()]:
            info = zipfile.ZipInfo(name, date_time=ZIP_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.create_system = 3  # unix, so the permissions below mean the same everywhere
            info.external_attr = 0o644 << 16
            z.writestr(info, data, compresslevel=9)
    blob = buf.getvalue()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(blob)
    tmp.replace(out)
    return hashlib.sha256(blob).hexdigest()


def _safe_name(name: str) -> bool:
    p = PurePosixPath(name)
    return bool(name) and not p.is_absolute() and ".." not in p.parts and "\\" not in name and not name.endswith("/")


def verify_bundle(path: Path, trusted: list[SSlibKey]) -> dict:
    """Check a bundle against trusted Ed25519 keys; returns the manifest. Raises BundleError naming what failed."""
    try:
        z = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise BundleError(f"{path}: not a readable zip ({e})") from e
    with z:
        infos = z.infolist()
        names = [i.filename for i in infos]
        if len(infos) > MAX_MEMBERS:
            raise BundleError(f"{path}: {len(infos)} members (limit {MAX_MEMBERS})")
        if len(set(names)) != len(names):
            raise BundleError(f"{path}: duplicate member names")
        unsafe = [n for n in names if not _safe_name(n)]
        if unsafe:
            raise BundleError(f"{path}: unsafe member path(s): {unsafe[:3]}")
        _check_layout(z, path)
        for required in (MANIFEST, SIGNATURE):
            if required not in names:
                raise BundleError(f"{path}: no {required}")
        manifest_bytes = _read(z, MANIFEST, MAX_MANIFEST_BYTES)
        try:
            sig = Signature.from_dict(json.loads(_read(z, SIGNATURE, 4096)))
        except (ValueError, KeyError, TypeError) as e:
            raise BundleError(f"{path}: {SIGNATURE} is malformed ({e})") from e
        key = next((k for k in trusted if k.keyid == sig.keyid), None)
        if key is None:
            raise BundleError(f"{path}: signed by key {sig.keyid[:16]}…, which is not a trusted key")
        try:
            key.verify_signature(sig, manifest_bytes)
        except UnverifiedSignatureError as e:
            raise BundleError(f"{path}: the manifest's signature does not verify (altered manifest?)") from e
        manifest = json.loads(manifest_bytes)
        if manifest.get("format") != BUNDLE_FORMAT:
            raise BundleError(f"{path}: format {manifest.get('format')!r}; this verifier reads {BUNDLE_FORMAT}")
        files: dict = manifest["files"]
        extra = set(names) - set(files) - {MANIFEST, SIGNATURE}
        if extra:
            raise BundleError(f"{path}: member(s) not in the signed manifest: {sorted(extra)[:3]}")
        for name, want in files.items():
            if name not in names:
                raise BundleError(f"{path}: {name} is listed in the manifest but missing")
            data = _read(z, name, want["bytes"])
            if len(data) != want["bytes"] or hashlib.sha256(data).hexdigest() != want["sha256"]:
                raise BundleError(f"{path}: {name} does not match its signed hash (altered or corrupted)")
        for key_name, entry in manifest["platforms"].items():
            if entry["sha256_kind"] == "tree":
                prefix = entry["artifact"] + "/"
                digest = hashlib.sha256()
                for name in sorted(n for n in files if n.startswith(prefix)):
                    digest.update(f"{name[len(prefix):]}\0{files[name]['sha256']}\n".encode())
                got = digest.hexdigest()
            else:
                got = files.get(entry["artifact"], {}).get("sha256")
            if got != entry["sha256"]:
                raise BundleError(f"{path}: the {key_name} artifact's hash does not match the manifest")
    return manifest


def _canonical_info(info: zipfile.ZipInfo) -> bool:
    return (info.date_time == ZIP_DATE and info.compress_type == zipfile.ZIP_DEFLATED and info.create_system == 3
            and info.create_version == info.extract_version == 20 and info.flag_bits == 0
            and info.internal_attr == 0 and info.external_attr == 0o644 << 16 and not info.extra
            and not info.comment and info.volume == 0)


def _check_layout(z: zipfile.ZipFile, path: Path) -> None:
    """Every byte outside the members' contents is what ``write_bundle`` writes, so a flipped bit in a header, a
    timestamp or the directory fails verification as surely as one in a member (contents are checked by hash)."""
    size = path.stat().st_size
    offset = 0
    directory = b""
    dos_date = (ZIP_DATE[0] - 1980) << 9 | ZIP_DATE[1] << 5 | ZIP_DATE[2]
    with path.open("rb") as f:
        for info in z.infolist():
            if not _canonical_info(info) or info.header_offset != offset or info.reserved:
                raise BundleError(f"{path}: {info.filename}: zip headers differ from a bundle's canonical form")
            header = info.FileHeader()
            f.seek(offset)
            if f.read(len(header)) != header:
                raise BundleError(f"{path}: {info.filename}: local header does not match the directory")
            name = info.filename.encode()
            directory += struct.pack(zipfile.structCentralDir, zipfile.stringCentralDir, 20, 3, 20, 0, 0,
                                     zipfile.ZIP_DEFLATED, 0, dos_date, info.CRC, info.compress_size,
                                     info.file_size, len(name), 0, 0, 0, 0, info.external_attr, offset) + name
            offset += len(header) + info.compress_size
        n = len(z.infolist())
        directory += struct.pack(zipfile.structEndArchive, zipfile.stringEndArchive, 0, 0, n, n,
                                 len(directory), offset, 0)
        f.seek(offset)
        if z.start_dir != offset or size != offset + len(directory) or f.read() != directory:
            raise BundleError(f"{path}: the zip directory differs from a bundle's canonical form")


def _read(z: zipfile.ZipFile, name: str, limit: int) -> bytes:
    """A member's bytes, never more than ``limit`` (a lying size header cannot make us read a zip bomb)."""
    try:
        with z.open(name) as f:
            data = f.read(limit + 1)
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError) as e:  # bad CRC, truncated, deflate
        raise BundleError(f"{name}: unreadable member ({e})") from e
    if len(data) > limit:
        raise BundleError(f"{name}: larger than its declared size")
    return data
