"""Study scoring on a synthetic study folder: real face photos in small mp4s, a random IR-SE50 and a
synthetic insightface recognition .onnx.

The facexlib_arcface numbers must equal Lynx Face Similarity's on the same decoded frames; the
insightface evaluator must be found in a pack by its shape (not its file name) and computed with
insightface's preprocessing; frames without a face are counted; reruns skip up-to-date scores and
keep a stale score aside instead of overwriting it.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lynx_batch.study import scoring
from lynx_batch.study.evaluators import (EvaluatorError, find_insightface_recognition, insightface_normalisation,
                                         parse_config)
from lynx_core.train.media import read_image
from lynx_core.video import write_video
from tests.conftest_face import astronaut, make_scrfd_onnx, models_root_with_arcface

EXAMPLE_FACE = Path(__file__).resolve().parents[1] / "lynx_core" / "assets" / "lynx_example_face.png"
SIZE = 320


def _frame_of(photo: np.ndarray) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(photo).resize((SIZE, SIZE), Image.BICUBIC))


def make_recognition_onnx(path: Path, seed: int = 0, first_nodes: tuple[str, str] | None = None) -> Path:
    """A tiny insightface-shaped recognition model: [N,3,112,112] -> per-channel mean -> @W [3,512].

    ``first_nodes`` names the first two nodes (e.g. ("Sub_0", "Mul_1")) as MXNet exports do; they
    then compute x - 0 and x * 1 so only the names differ.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = np.random.default_rng(seed).standard_normal((3, 512)).astype(np.float32)
    nodes, src = [], "input.1"
    inits = [numpy_helper.from_array(weight, "w")]
    if first_nodes:
        inits += [numpy_helper.from_array(np.zeros((1,), np.float32), "zero"),
                  numpy_helper.from_array(np.ones((1,), np.float32), "one")]
        nodes += [helper.make_node("Sub", [src, "zero"], ["subbed"], name=first_nodes[0]),
                  helper.make_node("Mul", ["subbed", "one"], ["mulled"], name=first_nodes[1])]
        src = "mulled"
    nodes += [helper.make_node("GlobalAveragePool", [src], ["pooled"]),
              helper.make_node("Flatten", ["pooled"], ["flat"]),
              helper.make_node("MatMul", ["flat", "w"], ["fc1"])]
    graph = helper.make_graph(nodes, "tiny_rec",
                              [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["N", 3, 112, 112])],
                              [helper.make_tensor_value_info("fc1", TensorProto.FLOAT, ["N", 512])],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def build_study(root: Path, jobs: dict[str, tuple[str, str, list[np.ndarray]]], evaluators: dict) -> Path:
    """A study folder as the runner writes it; ``jobs``: job id -> (setting id, subject id, frames)."""
    faces = root / "faces"
    faces.mkdir(parents=True)
    from PIL import Image

    Image.fromarray(read_image(EXAMPLE_FACE)).save(faces / "eileen.png")
    subjects = [{"id": "eileen", "face": str(faces / "eileen.png")}]
    study_dir = root / "study"
    (study_dir / "jobs").mkdir(parents=True)
    settings = sorted({s for s, _subj, _f in jobs.values()})
    (root / "study.toml").write_text("# the study file (only its folder matters here)\n")
    study = {"name": "synthetic", "study_file": str(root / "study.toml"), "study_sha256": "0" * 64,
             "settings": [{"id": s, "label": f"ip_scale={i}", "values": {"8.ip_scale": i}} for i, s in enumerate(settings)],
             "subjects": subjects, "prompts": [{"id": "p00", "text": "a person <waves>"}], "seeds": [1], "repeats": 1,
             "evaluators": evaluators}
    (study_dir / "study.json").write_text(json.dumps(study))
    for jid, (setting, subject, frames) in jobs.items():
        write_video(np.stack(frames), study_dir / "videos" / jid / "clip.mp4", fps=8, crf=12)
        (study_dir / "jobs" / f"{jid}.json").write_text(json.dumps({
            "job_id": jid, "setting_id": setting, "subject_id": subject, "face": subjects[0]["face"],
            "prompt_id": "p00", "prompt": "a person <waves>", "seed": 1, "repeat": 0, "status": "done",
            "error": None, "videos": [f"videos/{jid}/clip.mp4"]}))
    return study_dir


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """One job: 5 frames (face, grey, other face, grey, face); frames 0 and 2 are scored by both evaluators."""
    root = tmp_path_factory.mktemp("study")
    models = root / "models"
    pack = models / "insightface" / "models" / "buffalo_l"
    # A detector-shaped decoy under the recognition model's usual name: it must be skipped by shape.
    make_scrfd_onnx(pack / "w600k_r50.onnx")
    make_recognition_onnx(pack / "model_rec.onnx")
    (models / "facexlib").mkdir(parents=True)
    (models / "facexlib" / "recognition_arcface_ir_se50.pth").symlink_to(
        models_root_with_arcface() / "facexlib" / "recognition_arcface_ir_se50.pth")
    face = _frame_of(read_image(EXAMPLE_FACE))
    grey = np.full_like(face, 128)
    other = _frame_of(astronaut())
    frames = [face, grey, other, grey, np.ascontiguousarray(face[:, ::-1])]
    study_dir = build_study(root, {"s00-eileen": ("s00", "eileen", frames)},
                            {"detector": "mtcnn", "frame_stride": 2, "max_frames": 2, "models_dirs": [str(models)]})
    logs: list[str] = []
    scoring.score_study(study_dir, log=logs.append)
    return study_dir, models, logs


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> dict:
    """Evaluators for the tests of the bookkeeping: only the tiny insightface model (IR-SE50 is slow on a CPU)."""
    model = make_recognition_onnx(tmp_path_factory.mktemp("rec") / "rec.onnx")
    return {"detector": "mtcnn", "names": ["insightface"], "insightface": {"model": str(model)}}


def _score(study_dir: Path, jid: str = "s00-eileen") -> dict:
    return json.loads((study_dir / "scores" / f"{jid}.json").read_text())


def test_score_file_counts_frames_and_missing_faces(scored):
    study_dir, _models, logs = scored
    data = _score(study_dir)
    assert data["format"] == scoring.SCORE_FORMAT and data["job_id"] == "s00-eileen"
    (video,) = data["videos"]
    assert video["path"] == "videos/s00-eileen/clip.mp4" and len(video["sha256"]) == 64
    assert video["frames_decoded"] == 3  # decoding stops after the last frame scored
    assert set(video["scores"]) == {"facexlib_arcface", "insightface"}, logs
    for name, s in video["scores"].items():
        assert s["frame_indices"] == [0, 2]  # frame_stride 2, max_frames 2: the grey frame 1 is not scored
        assert s["frames_total"] == 2
        # frame 2 is the astronaut: a face, so nothing is missing here
        assert s["frames_no_face"] == 0 and all(v is not None for v in s["per_frame"]), name
        valid = [v for v in s["per_frame"]]
        assert s["mean"] == pytest.approx(float(np.mean(valid)), abs=1e-6)
        assert s["std"] == pytest.approx(float(np.std(valid)), abs=1e-6)
        q75, q25 = np.percentile(valid, [75, 25])
        assert s["iqr"] == pytest.approx(float(q75 - q25), abs=1e-6)
    info = data["evaluators"]
    assert info["facexlib_arcface"]["model"] == "recognition_arcface_ir_se50.pth"
    assert info["insightface"]["model"] == "model_rec.onnx" and info["insightface"]["pack"] == "buffalo_l"
    assert info["insightface"]["input_mean"] == 127.5 and info["insightface"]["input_std"] == 127.5
    for i in info.values():
        assert len(i["model_sha256"]) == 64 and i["version"] and i["detector"] == "mtcnn"
        assert i["frame_stride"] == 2 and i["max_frames"] == 2


def test_no_face_frames_are_null_and_counted(tmp_path, quick):
    face = _frame_of(read_image(EXAMPLE_FACE))
    grey = np.full_like(face, 90)
    study_dir = build_study(tmp_path, {"j": ("s00", "eileen", [grey, face, grey])}, quick)
    scoring.score_study(study_dir, log=lambda m: None)
    s = _score(study_dir, "j")["videos"][0]["scores"]["insightface"]
    assert s["frames_total"] == 3 and s["frames_no_face"] == 2
    assert s["per_frame"][0] is None and s["per_frame"][2] is None and s["per_frame"][1] is not None
    assert s["mean"] == pytest.approx(s["per_frame"][1], abs=1e-6)  # the mean is over frames with a face
    assert s["std"] == 0.0


def test_facexlib_scores_equal_lynx_face_similarity(scored, monkeypatch):
    import nodes.comfy_env as comfy_env
    from nodes.face import LynxEncodeFaceID, LynxFaceSimilarity

    study_dir, models, _logs = scored
    monkeypatch.setattr(comfy_env, "models_root_dirs", lambda: [models])
    monkeypatch.setattr(comfy_env, "temp_directory", lambda: study_dir.parent / "temp")
    photo = torch.from_numpy(read_image(EXAMPLE_FACE).copy()).float().div(255.0)[None]
    face = LynxEncodeFaceID().encode(photo, "mtcnn", "largest", 0, "torch", "error")["result"][0]
    idx, frames, _n = scoring.read_scored_frames(study_dir / "videos/s00-eileen/clip.mp4", 2, 2)
    mean, per_frame, _plot = LynxFaceSimilarity().score(torch.from_numpy(frames).float().div(255.0), face, "mtcnn")
    s = _score(study_dir)["videos"][0]["scores"]["facexlib_arcface"]
    assert json.loads(per_frame) == s["per_frame"]
    assert mean == pytest.approx(s["mean"], abs=1e-9)
    # and the numbers are not trivially equal: the two frames show other faces
    assert len(s["per_frame"]) == 2 and abs(s["per_frame"][0] - s["per_frame"][1]) > 1e-3


def test_insightface_scores_use_its_preprocessing(scored):
    """Recompute the synthetic model by hand: RGB crop, (x - 127.5) / 127.5, channel means @ W, cosine."""
    from lynx_core.face.align import align_arcface_112
    from lynx_core.face.analyzer import FaceAnalyzer

    study_dir, models, _logs = scored
    weight = np.random.default_rng(0).standard_normal((3, 512))
    analyzer = FaceAnalyzer(detector="mtcnn", models_dirs=[models])

    def embed(img):
        faces = analyzer.detect(img)
        big = max(faces, key=lambda f: f.area)
        crop = align_arcface_112(img, big.kps)[0].astype(np.float64)
        v = ((crop - 127.5) / 127.5).mean(axis=(0, 1)) @ weight
        return v / np.linalg.norm(v)

    ref = embed(read_image(EXAMPLE_FACE))
    _idx, frames, _n = scoring.read_scored_frames(study_dir / "videos/s00-eileen/clip.mp4", 2, 2)
    expected = [float(embed(f) @ ref) for f in frames]
    s = _score(study_dir)["videos"][0]["scores"]["insightface"]
    assert s["per_frame"] == pytest.approx(expected, abs=2e-5)
    # BGR input would give other numbers: the check above can tell the channel order apart
    bgr = [float(embed(np.ascontiguousarray(f[:, :, ::-1])) @ ref) for f in frames]
    assert not np.allclose(bgr, expected, atol=1e-3)
    # reported separately from facexlib's, with other numbers
    fx = _score(study_dir)["videos"][0]["scores"]["facexlib_arcface"]
    assert not np.allclose(fx["per_frame"], s["per_frame"], atol=1e-3)


def test_rerun_skips_up_to_date_scores(scored):
    study_dir, _models, _logs = scored
    before = (study_dir / "scores" / "s00-eileen.json").read_bytes()
    logs: list[str] = []
    scoring.score_study(study_dir, log=logs.append)
    assert (study_dir / "scores" / "s00-eileen.json").read_bytes() == before
    assert any("0 job(s) scored, 1 already up to date" in m for m in logs), logs


def test_changed_video_is_rescored_and_old_score_kept(tmp_path, quick):
    face = _frame_of(read_image(EXAMPLE_FACE))
    study_dir = build_study(tmp_path, {"j": ("s00", "eileen", [face])}, quick)
    scoring.score_study(study_dir, log=lambda m: None)
    first = _score(study_dir, "j")
    # The video is replaced by another one (a re-render): its sha256 changes, so the score is stale.
    grey = np.full_like(face, 60)
    (study_dir / "videos/j/clip.mp4").unlink()
    write_video(np.stack([grey, face]), study_dir / "videos/j/clip.mp4", fps=8)
    logs: list[str] = []
    scoring.score_study(study_dir, log=logs.append)
    second = _score(study_dir, "j")
    assert second["videos"][0]["sha256"] != first["videos"][0]["sha256"]
    assert second["videos"][0]["scores"]["insightface"]["frames_total"] == 2
    kept = study_dir / "scores" / "superseded" / "j.json"
    assert json.loads(kept.read_text()) == first
    assert any("kept it as scores/superseded/j.json" in m for m in logs), logs


def test_unscorable_job_is_named_and_others_go_on(tmp_path, quick):
    face = _frame_of(read_image(EXAMPLE_FACE))
    study_dir = build_study(tmp_path, {"a": ("s00", "eileen", [face]), "b": ("s00", "eileen", [face])}, quick)
    (study_dir / "videos/a/clip.mp4").write_bytes(b"not a video")
    logs: list[str] = []
    scoring.score_study(study_dir, log=logs.append)
    assert not (study_dir / "scores" / "a.json").exists() and (study_dir / "scores" / "b.json").exists()
    assert any(m.startswith("scoring: a: NOT scored") for m in logs), logs
    assert any("1 job(s) scored, 0 already up to date, 1 not scorable" in m for m in logs), logs


def test_recognition_model_found_by_shape_not_name(tmp_path):
    pack = tmp_path / "insightface" / "models" / "antelopev2" / "antelopev2"  # the nested zip layout
    make_scrfd_onnx(pack / "glintr100.onnx")  # right name, detector shape
    assert find_insightface_recognition([tmp_path]) is None
    make_recognition_onnx(pack / "something.onnx")
    path, name = find_insightface_recognition([tmp_path])
    assert path.name == "something.onnx" and name == "antelopev2"
    with pytest.raises(EvaluatorError, match="not a face recognition model"):
        find_insightface_recognition([], pack / "glintr100.onnx")


def test_insightface_normalisation_follows_arcfaceonnx(tmp_path):
    assert insightface_normalisation(make_recognition_onnx(tmp_path / "a.onnx")) == (127.5, 127.5)
    mx = make_recognition_onnx(tmp_path / "b.onnx", first_nodes=("Sub_0", "Mul_1"))
    assert insightface_normalisation(mx) == (0.0, 1.0)


def test_evaluator_table_errors_name_the_key(tmp_path):
    with pytest.raises(EvaluatorError, match=r"evaluators.frame_stride: expected a whole number >= 1"):
        parse_config({"frame_stride": 0}, tmp_path)
    with pytest.raises(EvaluatorError, match=r"evaluators: unknown key\(s\) \['stride'\]"):
        parse_config({"stride": 2}, tmp_path)
    with pytest.raises(EvaluatorError, match=r"evaluators.insightface.model: .*missing.onnx does not exist"):
        parse_config({"insightface": {"model": "missing.onnx"}}, tmp_path)
    cfg = parse_config({"facexlib": {}, "insightface": False, "max_frames": 16}, tmp_path)
    assert cfg.names == ["facexlib_arcface"] and cfg.max_frames == 16
    auto = parse_config({}, tmp_path)
    assert auto.names is None and auto.required == {"facexlib_arcface"}
    assert parse_config({"insightface": True}, tmp_path).required == {"facexlib_arcface", "insightface"}


def test_asked_for_insightface_without_a_model_is_an_error(tmp_path):
    from lynx_batch.study.evaluators import build_evaluators

    cfg = parse_config({"insightface": True, "detector": "mtcnn", "models_dirs": [str(models_root_with_arcface())]},
                       tmp_path)
    with pytest.raises(EvaluatorError, match="insightface is asked for.*antelopev2"):
        build_evaluators(cfg, log=lambda m: None)


def test_report_of_a_scored_study(scored):
    """The report reads what scoring wrote: both evaluators apart, with the scores' numbers and a contact sheet."""
    import csv

    from lynx_batch.study.report import write_report

    study_dir, _models, _logs = scored
    paths = write_report(study_dir)
    with open(paths["csv"], newline="") as f:
        rows = list(csv.DictReader(f))
    s = _score(study_dir)["videos"][0]["scores"]
    assert {r["evaluator"]: float(r["mean"]) for r in rows} == pytest.approx(
        {name: v["mean"] for name, v in s.items()}, abs=1e-12)
    assert {r["frames_total"] for r in rows} == {"2"}
    (sheet,) = (study_dir / "report" / "report_assets").glob("*.jpg")
    assert f'src="report_assets/{sheet.name}"' in paths["html"].read_text()
